"""Write an evaluation's results as ``report.json`` (every number), ``report.md`` and ``report.html`` (for people).

``report.html`` is one self-contained file (its plots embedded as data URIs, no script, no external link): it
opens in any browser, and can be mailed or attached as it is.

The results dict
================

One dict describes one evaluation of one or more checkpoints on the same
prompts. Only ``checkpoints`` is required; every other key, and every metric,
may be missing (the table shows "—" and leaves out rows no checkpoint has)::

    {
      "title":     "Arithmetic demo: SFT vs DPO",        # optional heading
      "created":   "2025-01-01T12:00:00+00:00",           # filled in when absent
      "spec":      {...},                                 # the eval spec as run (free-form, echoed)
      "versions":  {"torch": "2.13.0", "transformers": "5.23.0", ...},
      "seeds":     {"generation": 0, "bootstrap": 0},
      "baseline":  "sft",          # checkpoint the win rates compare against (a key of "checkpoints")
      "reference": "sft",          # checkpoint KL is measured to (a key of "checkpoints")
      "checkpoints": {
        "<name>": {
          "path": "runs/dpo/final",
          "metrics": {
            "greedy_accuracy":   0.64,                     # fraction, shown as a percentage
            "sampled_accuracy":  0.51,
            "reward":            {"<source>": {"mean": .., "std": .., "n": .., "n_none": ..}},   # stats.mean_std
            "win_rate":          {"<source>": {"win_rate": .., "ci_low": .., "ci_high": .., "confidence": ..,
                                               "win": .., "tie": .., "loss": .., "n": .., "tie_rate": ..}},
                                                           # stats.win_rate_with_ci, vs "baseline"
            "kl_to_reference":   {"k1": .., "k1_stderr": .., "k3": .., "k3_stderr": .., "n": ..},  # stats.kl_monte_carlo
            "perplexity":        12.3,
            "mean_length":       4.2,                      # completion tokens (greedy), EOS not counted
            "distinct_1":        0.31,
            "distinct_2":        0.55,
            "eos_rate":          0.98,                     # fraction of completions that ended with EOS
            "<any other name>":  <number>                  # shown in the table under its own name
          },
          "samples": [                                     # same prompts, same order, in every checkpoint
            {"prompt": "What is 2 + 3?" | [{"role": .., "content": ..}], "reference": "5",
             "completion": "5", "correct": true}           # "correct" optional: adds a check or cross mark
          ],
          "scores": {"<source>": [0.0, 1.0, null, ...]}    # per prompt, for plots.plot_score_distributions
        }
      },
      "plots": {"Score distributions": "scores.png"},     # optional: image paths relative to out_dir
      "lm_eval": {"tasks": ["arc_easy"], "limit": 100,    # optional: `align eval --lm-eval`, see lm_harness.py
                  "status": "ok", "device": "cpu",        # or "status": "skipped", "reason": "..."
                  "checkpoints": {"<name>": {"tasks": {"arc_easy": {"acc,none": .., "acc_stderr,none": ..}}}}},
                                                          # or {"<name>": {"error": "..."}}
      "notes": ["free text shown at the end of report.md"]
    }

``report.json`` holds this dict as given (numpy numbers turned into Python
ones; a NaN or infinity written as the string "nan", "inf" or "-inf", since
JSON has no such numbers). Both files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignment.errors import DataError

__all__ = ["render_html", "render_markdown", "write_report"]

DASH = "—"


def write_report(results: dict, out_dir: str | os.PathLike, *, max_samples: int = 10) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir`` (created if needed).

    ``results`` follows the schema in this module's docstring; it is checked
    first (``DataError`` names what is wrong). ``max_samples`` bounds the
    side-by-side sample table of report.md (report.html shows up to ``HTML_SAMPLES``). The plots named in
    ``results["plots"]`` are read from ``out_dir`` into report.html, so write them first.
    Returns ``{"json": path, "md": path, "html": path}``.
    """
    _validate(results)
    results = dict(results)
    results.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, html_path = out / "report.json", out / "report.md", out / "report.html"
    _atomic_write(json_path, json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    _atomic_write(md_path, render_markdown(results, max_samples=max_samples))
    _atomic_write(html_path, render_html(results, out))
    return {"json": json_path, "md": md_path, "html": html_path}


# --------------------------------------------------------------------------- checks and JSON


def _validate(results: Any) -> None:
    if not isinstance(results, dict):
        raise DataError(f"results must be a dict, got {type(results).__name__}")
    checkpoints = results.get("checkpoints")
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise DataError(
            "results['checkpoints'] must be a non-empty dict of {name: {path, metrics, samples, scores}}"
        )
    for name, ckpt in checkpoints.items():
        if not isinstance(ckpt, dict):
            raise DataError(f"results['checkpoints'][{name!r}] must be a dict, got {type(ckpt).__name__}")
        for key, kind in (("metrics", dict), ("samples", list), ("scores", dict)):
            if key in ckpt and not isinstance(ckpt[key], kind):
                raise DataError(f"results['checkpoints'][{name!r}][{key!r}] must be a {kind.__name__}")
    for role in ("baseline", "reference"):
        name = results.get(role)
        if name is not None and name not in checkpoints:
            raise DataError(
                f"results[{role!r}] = {name!r} is not a checkpoint; checkpoints: {', '.join(checkpoints)}"
            )


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/torch numbers and arrays to Python, non-finite floats to strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return (
            value
            if math.isfinite(value)
            else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    """Write to a hidden temporary name beside ``path``, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return DASH
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1000 or abs(x) < 10**-digits):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return DASH if x is None else (_num(x) if isinstance(x, str) else f"{100 * float(x):.1f}%")


def _cell(text: str, limit: int = 300) -> str:
    """Text made safe for one markdown table cell."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or " "


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if len(prompt) == 1:
            return str(prompt[0].get("content", ""))
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


# --------------------------------------------------------------------------- markdown


def _table_rows(results: dict, names: list[str]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per checkpoint) for every metric at least one checkpoint has."""
    ckpts = results["checkpoints"]
    metrics = {n: ckpts[n].get("metrics", {}) or {} for n in names}
    baseline, reference = results.get("baseline"), results.get("reference")
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, cell: Callable[[str, dict], str], present: Callable[[dict], bool]) -> None:
        if any(present(metrics[n]) for n in names):
            rows.append((label, [cell(n, metrics[n]) for n in names]))

    def accuracy_cell(m: dict, prefix: str) -> str:
        # a sample whose reward failed is not in the denominator: say how many, never hide it
        failed = m.get(f"{prefix}_accuracy_failed") or 0
        cell = _pct(m.get(f"{prefix}_accuracy"))
        return cell + (f" ({int(failed)} failed, of {int(failed + m[f'{prefix}_accuracy_scored'])})"
                       if failed else "")

    add("Greedy accuracy", lambda n, m: accuracy_cell(m, "greedy"), lambda m: "greedy_accuracy" in m)
    add("Sampled accuracy", lambda n, m: accuracy_cell(m, "sampled"), lambda m: "sampled_accuracy" in m)

    sources = sorted({s for n in names for s in (metrics[n].get("reward") or {})})
    for source in sources:

        def reward_cell(n: str, m: dict, source: str = source) -> str:
            r = (m.get("reward") or {}).get(source)
            if not r or r.get("mean") is None:
                return DASH
            return f"{_num(r['mean'])} ± {_num(r.get('std'))}"

        add(f"Reward `{source}` (mean ± std)", reward_cell, lambda m: True)

    def win(m: dict, source: str) -> dict:
        return (m.get("win_rate") or {}).get(source) or {}

    for source in sorted({s for n in names for s in (metrics[n].get("win_rate") or {})}):

        def win_cell(n: str, m: dict, source: str = source) -> str:
            if n == baseline:
                return "(baseline)"
            w = win(m, source)
            if not w:
                return DASH
            ci = f" [{_num(w.get('ci_low'))}, {_num(w.get('ci_high'))}]" if "ci_low" in w else ""
            ties = w.get("tie_rate")
            if ties is None and w.get("n") and "tie" in w:
                ties = w["tie"] / w["n"]
            return f"{_num(w.get('win_rate'))}{ci}, ties {_pct(ties)}"

        levels = [win(metrics[n], source).get("confidence") for n in names]
        confidence = next((c for c in levels if c is not None), 0.95)
        against = f" vs `{baseline}`" if baseline else ""
        add(f"Win rate{against} by `{source}` [{100 * confidence:.0f}% CI]", win_cell, lambda m: True)

    def kl_cell(n: str, m: dict, key: str) -> str:
        kl = m.get("kl_to_reference")
        if kl is None:
            return "0 (reference)" if n == reference else DASH
        if not isinstance(kl, dict):  # a bare number is taken as the k1 estimate
            return _num(kl) if key == "k1" else DASH
        if kl.get(key) is None:
            return DASH
        se = kl.get(f"{key}_stderr")
        return _num(kl[key]) + (f" ± {_num(se)}" if se is not None else "")

    to = f" to `{reference}`" if reference else " to reference"
    for key in ("k1", "k3"):
        add(
            f"KL{to}, {key} (± s.e.)",
            lambda n, m, key=key: kl_cell(n, m, key),
            lambda m, key=key: (
                "kl_to_reference" in m
                and (
                    not isinstance(m["kl_to_reference"], dict) and key == "k1" or key in m["kl_to_reference"]
                )
            ),
        )

    add("Perplexity", lambda n, m: _num(m.get("perplexity")), lambda m: "perplexity" in m)
    add("Mean length (tokens)", lambda n, m: _num(m.get("mean_length"), 1), lambda m: "mean_length" in m)
    add("Distinct-1", lambda n, m: _num(m.get("distinct_1")), lambda m: "distinct_1" in m)
    add("Distinct-2", lambda n, m: _num(m.get("distinct_2")), lambda m: "distinct_2" in m)
    add("EOS rate", lambda n, m: _pct(m.get("eos_rate")), lambda m: "eos_rate" in m)

    known = {
        "greedy_accuracy",
        "sampled_accuracy",
        "greedy_accuracy_scored",
        "greedy_accuracy_failed",
        "sampled_accuracy_scored",
        "sampled_accuracy_failed",
        "reward",
        "win_rate",
        "kl_to_reference",
        "perplexity",
        "mean_length",
        "distinct_1",
        "distinct_2",
        "eos_rate",
    }
    extra = sorted({k for n in names for k, v in metrics[n].items() if k not in known and _is_scalar(v)})
    for key in extra:
        add(f"`{key}`", lambda n, m, key=key: _num(m.get(key)), lambda m, key=key: key in m)
    return rows


def _is_scalar(v: Any) -> bool:
    return (
        v is None or isinstance(v, (int, float, str)) or (hasattr(v, "ndim") and getattr(v, "ndim", 1) == 0)
    )


def _markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _samples_section(results: dict, names: list[str], max_samples: int) -> list[str]:
    ckpts = results["checkpoints"]
    samples = {n: ckpts[n].get("samples") or [] for n in names}
    count = min((len(s) for s in samples.values() if s), default=0)
    count = min(count, max_samples)
    if count == 0:
        return []
    first = next(n for n in names if samples[n])
    lines = ["## Sample completions", ""]
    mismatched = [
        i
        for i in range(count)
        if any(
            samples[n]
            and _prompt_text(samples[n][i].get("prompt")) != _prompt_text(samples[first][i].get("prompt"))
            for n in names
        )
    ]
    if mismatched:
        lines += [
            f"> Warning: the checkpoints' samples differ in prompt at rows {mismatched}; "
            f"prompts shown are `{first}`'s.",
            "",
        ]
    rows = []
    for i in range(count):
        head = samples[first][i]
        reference = head.get("reference")
        row = [
            str(i + 1),
            _cell(_prompt_text(head.get("prompt", ""))),
            _cell(DASH if reference is None else reference),
        ]
        for n in names:
            if not samples[n]:
                row.append(DASH)
                continue
            s = samples[n][i]
            mark = {True: " ✓", False: " ✗"}.get(s.get("correct"), "")
            row.append(_cell(s.get("completion", "")) + mark)
        rows.append(row)
    lines += _markdown_table(["#", "prompt", "reference", *[f"`{n}`" for n in names]], rows)
    total = max(len(s) for s in samples.values())
    if total > count:
        lines += ["", f"({count} of {total} samples shown; all are in report.json.)"]
    return lines + [""]


def render_markdown(results: dict, *, max_samples: int = 10) -> str:
    """The text of ``report.md`` for a results dict (see the module docstring)."""
    _validate(results)
    ckpts = results["checkpoints"]
    names = list(ckpts)
    baseline, reference = results.get("baseline"), results.get("reference")
    lines = [f"# {results.get('title') or 'Evaluation report'}", ""]
    if results.get("created"):
        lines += [f"Created {results['created']}.", ""]

    lines += ["## Checkpoints", ""]
    for n in names:
        roles = [r for r, v in (("baseline", baseline), ("KL reference", reference)) if v == n]
        role = f" ({', '.join(roles)})" if roles else ""
        lines.append(f"- `{n}`{role}: `{ckpts[n].get('path', DASH)}`")
    lines.append("")

    rows = _table_rows(results, names)
    lines += ["## Metrics", ""]
    if rows:
        lines += _markdown_table(
            ["metric", *[f"`{n}`" for n in names]],
            [[label, *cells] for label, cells in rows],
            [":---", *["---:"] * len(names)],
        )
    else:
        lines.append("(no metrics)")
    lines += ["", *_definitions(rows), ""]

    if results.get("lm_eval"):
        from alignment.evaluation.lm_harness import markdown

        lines += markdown(results["lm_eval"])

    plots = results.get("plots") or {}
    if plots:
        lines += ["## Plots", ""]
        for title, rel in plots.items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]

    lines += _samples_section(results, names, max_samples)

    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]

    setup = {k: results[k] for k in ("spec", "seeds", "versions") if results.get(k)}
    if setup:
        lines += ["## Setup", ""]
        for key, value in setup.items():
            lines += [
                f"**{key}**",
                "",
                "```json",
                json.dumps(_jsonable(value), indent=2, sort_keys=True),
                "```",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def _definitions(rows: list[tuple[str, list[str]]]) -> list[str]:
    labels = " ".join(label for label, _ in rows)
    notes = []
    if "accuracy" in labels:
        notes.append(
            "accuracy: the first integer of the completion equals the answer; greedy = argmax decoding, "
            "sampled = the policy's own sampling distribution"
        )
    if "Win rate" in labels:
        notes.append(
            "win rate = (wins + 0.5 ties) / prompts, paired per prompt, percentile-bootstrap CI over prompts"
        )
    if "KL" in labels:
        notes.append(
            "KL(policy || reference) per completion, Monte-Carlo over sampled completions: "
            "k1 = sum of log-ratios, k3 = sum of (r - 1 - log r) with r = p_ref / p_policy"
        )
    if "Distinct" in labels:
        notes.append("distinct-n = unique n-grams / all n-grams over the set of completions")
    return [f"<sub>{'; '.join(notes)}.</sub>"] if notes else []


# --------------------------------------------------------------------------- html

HTML_SAMPLES = 200  # rows of the side-by-side table in report.html (every sample is in report.json)

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#1d2330}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #dde1e8;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0}th,td{border:1px solid #dde1e8;padding:.3rem .6rem;vertical-align:top}
th{background:#f3f5f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f3f5f8;padding:0 .2rem;border-radius:3px}.ok{color:#1a7f37}.bad{color:#cf222e}
img{max-width:100%;border:1px solid #dde1e8}pre{background:#f6f8fa;padding:.6rem;overflow:auto}
.muted{color:#667085;font-size:.9rem}td.text{white-space:pre-wrap;max-width:28rem}
"""


def _inline(text: Any) -> str:
    """One cell's text as HTML: escaped, with the `code` spans of the markdown labels kept as <code>."""
    import html
    import re

    escaped = html.escape(str(text))
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escaped)


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int | None = None) -> list[str]:
    lines = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [f'<td class="num">{c}</td>' if numeric_from is not None and i >= numeric_from else f"<td>{c}</td>"
                 for i, c in enumerate(row)]
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return lines + ["</table>"]


def _embedded_image(out_dir: Path | None, rel: str) -> str | None:
    """A plot as a data URI (report.html carries its pictures), or None when the file is not there."""
    import base64
    import mimetypes

    if out_dir is None:
        return None
    path = Path(out_dir) / rel
    if not path.is_file():
        return None
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_samples(results: dict, names: list[str], limit: int) -> list[str]:
    import html

    ckpts = results["checkpoints"]
    samples = {n: ckpts[n].get("samples") or [] for n in names}
    with_samples = [n for n in names if samples[n]]
    count = min([len(samples[n]) for n in with_samples] + [limit]) if with_samples else 0
    if count == 0:
        return []
    first = with_samples[0]
    lines = ["<h2>Sample completions</h2>",
             "<p class=\"muted\">The same prompts, in the same order, for every checkpoint; "
             "✓ right, ✗ wrong by the task's rule.</p>"]
    rows = []
    for i in range(count):
        head = samples[first][i]
        reference = head.get("reference")
        row = [str(i + 1), html.escape(_prompt_text(head.get("prompt", ""))),
               html.escape(DASH if reference is None else str(reference))]
        for n in with_samples:
            s = samples[n][i]
            mark = {True: ' <span class="ok">✓</span>', False: ' <span class="bad">✗</span>'}.get(s.get("correct"), "")
            row.append(html.escape(str(s.get("completion", ""))) + mark)
        rows.append(row)
    table = _html_table(["#", "prompt", "reference", *[f"<code>{html.escape(n)}</code>" for n in with_samples]], rows)
    lines += [line.replace("<td>", '<td class="text">') for line in table]
    total = max(len(samples[n]) for n in with_samples)
    if total > count:
        lines.append(f'<p class="muted">({count} of {total} samples shown; all are in report.json.)</p>')
    return lines


def render_html(results: dict, out_dir: str | os.PathLike | None = None, *, max_samples: int = HTML_SAMPLES) -> str:
    """The text of ``report.html``: the tables of report.md, the plots (read from ``out_dir``) embedded."""
    import html

    _validate(results)
    ckpts = results["checkpoints"]
    names = list(ckpts)
    baseline, reference = results.get("baseline"), results.get("reference")
    title = html.escape(str(results.get("title") or "Evaluation report"))
    body = [f"<h1>{title}</h1>"]
    if results.get("created"):
        body.append(f'<p class="muted">Created {html.escape(str(results["created"]))}.</p>')
    body.append("<h2>Checkpoints</h2><ul>")
    for n in names:
        roles = [r for r, v in (("baseline", baseline), ("KL reference", reference)) if v == n]
        role = f" ({', '.join(roles)})" if roles else ""
        body.append(f"<li><code>{html.escape(n)}</code>{role}: <code>{html.escape(str(ckpts[n].get('path', DASH)))}"
                    "</code></li>")
    body.append("</ul>")

    rows = _table_rows(results, names)
    body.append("<h2>Metrics</h2>")
    if rows:
        body += _html_table(["metric", *[f"<code>{html.escape(n)}</code>" for n in names]],
                            [[_inline(label), *[_inline(c) for c in cells]] for label, cells in rows], numeric_from=1)
        notes = _definitions(rows)
        if notes:
            body.append(f'<p class="muted">{html.escape(notes[0][len("<sub>"):-len("</sub>")])}</p>')
    else:
        body.append("<p>(no metrics)</p>")

    pairwise = results.get("pairwise") or {}
    if pairwise:
        columns = list(next(iter(pairwise.values())))
        body.append(f"<h2>Pairwise judge: each checkpoint against <code>{html.escape(str(baseline))}</code></h2>")
        body += _html_table(["checkpoint", *columns],
                            [[f"<code>{html.escape(n)}</code>", *[_inline(_num(t.get(c))) for c in columns]]
                             for n, t in pairwise.items()], numeric_from=1)

    if results.get("lm_eval"):
        from alignment.evaluation.lm_harness import markdown

        body += ["<h2>lm-evaluation-harness</h2>", f"<pre>{html.escape(chr(10).join(markdown(results['lm_eval'])))}</pre>"]

    plots = results.get("plots") or {}
    if plots:
        body.append("<h2>Plots</h2>")
        for plot_title, rel in plots.items():
            uri = _embedded_image(Path(out_dir) if out_dir is not None else None, rel)
            body.append(f"<h3>{html.escape(plot_title)}</h3>")
            body.append(f'<img alt="{html.escape(plot_title)}" src="{uri}">' if uri else
                        f'<p class="muted">({html.escape(rel)} was not found beside the report)</p>')

    body += _html_samples(results, names, max_samples)

    notes = results.get("notes") or []
    if notes:
        body += ["<h2>Notes</h2><ul>", *[f"<li>{html.escape(str(note))}</li>" for note in notes], "</ul>"]
    setup = {k: results[k] for k in ("spec", "seeds", "versions") if results.get(k)}
    if setup:
        body.append("<h2>Setup</h2>")
        for key, value in setup.items():
            body += [f"<h3>{html.escape(key)}</h3>",
                     f"<pre>{html.escape(json.dumps(_jsonable(value), indent=2, sort_keys=True))}</pre>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
