"""Words for people: the terminal text of every command (analysis, dynamics, suggest, compare)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rankscope.formatting import band_text, fmt
from rankscope.maths.compare import METRICS, p_text, ranks_text
from rankscope.maths.verdict import describe_spread

PER_RANK_HEADER = ("per-rank view  slot norms scale·‖b_i‖·‖a_i‖: the paper's measure and what BeamLoRA acts on; "
                   "they depend on the A/B basis")
SPECTRAL_HEADER = ("spectral view  singular values of ΔW: basis-independent, how many directions the update "
                   "really uses")


def directions_line(summary: dict[str, Any]) -> str:
    """``k95 median 5 of 16 (IQR 4–6); k90 4, k99 9; stable rank 1.3; spectral eff. rank / r 0.50`` (medians)."""
    k = summary["energy_ranks"]
    if len(summary["ranks"]) == 1:
        kk = lambda b: fmt(b, 0) if b is not None and math.isfinite(b) and float(b).is_integer() else fmt(b, 1)  # noqa: E731
        energy = (f"k95 median {kk(k['0.95']['median'])} of {summary['ranks'][0]} "
                  f"(IQR {kk(k['0.95']['q25'])}–{kk(k['0.95']['q75'])}); k90 {kk(k['0.9']['median'])}, "
                  f"k99 {kk(k['0.99']['median'])}")
    else:
        energy = f"k95 / r {band_text(summary['energy_rank_ratio'], 2)}"
    return (f"{energy}; stable rank {fmt(summary['stable_rank']['median'], 1)}; spectral eff. rank / r "
            f"{fmt(summary['spectral_effective_rank_ratio']['median'], 2)}")


def per_rank_lines(s: dict[str, Any]) -> list[str]:
    """The per-rank view's lines of a summary; for LoHa / LoKr modules, that it is undefined for them."""
    undefined = s.get("per_rank_undefined", 0)
    lines = [] if undefined == s["modules"] else [
        "  " + PER_RANK_HEADER,
        f"  top-10% share  {band_text(s['top10_share'])}   uniform would be {fmt(s['top10_share_uniform'])}",
        f"  eff. rank / r  {band_text(s['effective_rank_ratio'])}   (entropy-based; 1 = all slots equal)",
        f"  gini           {band_text(s['gini'])}",
        "  deciles        " + " ".join(fmt(x, 2) for x in s["deciles"]["median"])
        + "   (median over modules, 0%..100%, / module's largest)",
    ]
    if undefined:
        lines.append(f"  per-rank view  undefined for the {undefined} LoHa / LoKr module(s): their ΔW is not a sum of "
                     "rank-one B·A slots, so there are no slot norms; the spectral view is exact for them")
    return lines


def scale_sources_text(sources: list[str]) -> str:
    """Where the scales were read from, after them: `` (lora_adapter_metadata)``; a few at most."""
    if not sources:
        return ""
    shown = "; ".join(sources[:3]) + (f"; +{len(sources) - 3} more" if len(sources) > 3 else "")
    return f" ({shown})"


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The terminal summary of an analysis document: the last snapshot in both views, plus the series' span."""
    snapshots = document["snapshots"]
    last = snapshots[-1]
    s = last["summary"]
    where = f"{document['path']} ({document['format']}"
    if document.get("layout") not in (None, "single"):
        steps = [x["step"] for x in snapshots]
        where += f", {document['layout']}, {len(snapshots)} snapshots, steps {steps[0]}–{steps[-1]}; showing the last"
    where += ")"
    ranks = ", ".join(map(str, s["ranks"]))
    scales = ", ".join(f"{x:g}" for x in s["scales"]) + scale_sources_text(s.get("scale_sources") or [])
    lines = [
        f"rankscope: {where}",
        f"  modules        {s['modules']}   ranks {ranks}   scale {scales}   ({s['total_ranks']} ranks in all"
        + (f"; {last['skipped']} non-LoRA tensors skipped)" if last["skipped"] else ")"),
    ]
    lines += per_rank_lines(s)
    if s.get("spectral_modules"):
        lines += [
            "  " + SPECTRAL_HEADER,
            f"  directions     {directions_line(s)}",
            f"  full rank      k95 = r in {s['full_rank_modules']} of {s['spectral_modules']} modules"
            + (f"; {s['zero_modules']} with a zero update" if s["zero_modules"] else ""),
        ]
    lines.append(f"  verdict        {describe_spread(s)}")
    good = [m for m in last["modules"] if m.get("importance") is not None and math.isfinite(m.get("top10_share") or math.nan)]
    if len(good) > 1:
        most = max(good, key=lambda m: m["top10_share"])
        least = min(good, key=lambda m: m["top10_share"])
        lines.append(f"  most unequal   {most['name']} (top-10% share {fmt(most['top10_share'])})")
        lines.append(f"  most even      {least['name']} (top-10% share {fmt(least['top10_share'])})")
        spectral = [m for m in good if m.get("energy_rank")]
        if spectral:
            fewest = min(spectral, key=lambda m: (m["energy_rank"]["0.95"] / m["rank"], m["name"]))
            widest = max(spectral, key=lambda m: (m["energy_rank"]["0.95"] / m["rank"], m["name"]))
            lines.append(f"  fewest dirs    {fewest['name']} (k95 {fewest['energy_rank']['0.95']} of {fewest['rank']})")
            lines.append(f"  most dirs      {widest['name']} (k95 {widest['energy_rank']['0.95']} of {widest['rank']})")
    if len(snapshots) > 1:
        first = snapshots[0]["summary"]
        line = (f"  over training  top-10% share {fmt(first['top10_share']['median'])} at step {snapshots[0]['step']}"
                f" -> {fmt(s['top10_share']['median'])} at step {last['step']}")
        if first.get("spectral_modules") and s.get("spectral_modules"):
            line += (f"; k95 / r {fmt(first['energy_rank_ratio']['median'], 2)} -> "
                     f"{fmt(s['energy_rank_ratio']['median'], 2)}")
        lines.append(line)
    errors = s["errors"]
    if len(errors) > 5:
        lines.append(f"  problems       {len(errors)} of {s['modules']} modules could not be analysed; the first five "
                     "(every module's error is in the JSON):")
    for error in errors[:5]:
        lines.append(f"  problem        {error}")
    for note in last.get("notes", []):
        lines.append(f"  note           {note}")
    return lines


def dynamics_summary_lines(dyn: dict[str, Any], rec: dict[str, Any] | None = None) -> list[str]:
    """Terminal summary of :func:`dynamics` and, if given, of ``recommend.recommend``."""
    steps = dyn["steps"]
    sep = dyn["separation"]
    lines = [f"dynamics: {dyn.get('path')} ({dyn['snapshots']} snapshots"
             + (f", steps {steps[0]}–{steps[-1]})" if steps else ")")]
    if dyn["spread"]:
        first, last = dyn["spread"][0], dyn["spread"][-1]
        lines.append(f"  top-10% share  {fmt(first['top10_share']['median'])} -> {fmt(last['top10_share']['median'])}"
                     f"   (per-rank view, median over modules; uniform {fmt(sep.get('uniform_top10_share'))})")
        lines.append(f"  eff. rank / r  {fmt(first['effective_rank_ratio']['median'])} -> "
                     f"{fmt(last['effective_rank_ratio']['median'])}   (per-rank view)")
        if last["energy_rank_ratio"]["n"]:
            lines.append(f"  k95 / r        {fmt(first['energy_rank_ratio']['median'])} -> "
                         f"{fmt(last['energy_rank_ratio']['median'])}   (spectral view: share of the rank holding "
                         "95% of ΔW's energy)")
            lines.append(f"  stable rank/r  {fmt(first['stable_rank_ratio']['median'])} -> "
                         f"{fmt(last['stable_rank_ratio']['median'])}   (spectral view)")
    excess = sep.get("relative_excess", float("nan"))
    lines.append(f"  separation     {sep['verdict']}"
                 + (f"; per-rank top-10% share {fmt(excess * 100, 1)}% above uniform" if math.isfinite(excess) else ""))
    if dyn["stability"]:
        rhos = " ".join(fmt(p["median"], 2) for p in dyn["stability"])
        lines.append(f"  rank order     median Spearman between consecutive snapshots: {rhos}")
        where = (f"stable (rho ≥ {dyn['threshold']:g}) from step {dyn['stable_from']}"
                 if dyn["stable_from_index"] is not None else f"never stayed ≥ {dyn['threshold']:g}")
        lines.append(f"  stability      {where}")
        if any(p["modules"] for p in dyn.get("spectral_stability", [])):
            shares = " ".join(fmt(p["steady_share"], 2) for p in dyn["spectral_stability"])
            lines.append(f"  energy ranks   share of modules whose k95 stayed put between snapshots: {shares}")
            where = (f"steady (share ≥ {dyn['threshold']:g}) from step {dyn['spectral_stable_from']}"
                     if dyn["spectral_stable_from_index"] is not None else f"never stayed ≥ {dyn['threshold']:g}")
            lines.append(f"  spectral stab. {where}")
    else:
        lines.append("  stability      one snapshot: no ordering to compare")
    for op in dyn.get("operations", []):
        lines.append(f"  operation      step {op['step']}: p {fmt(op['p'])}, {op['pruned_total']} ranks pruned "
                     f"in {op['modules_operated']} modules")
    if rec is not None:
        lines.append(f"  recommend      p_init {rec['p_init']:.2f}, delta_t {rec['delta_t']} "
                     f"(end_step {rec['end_step']} of {rec['total_steps']} steps)")
        lines += [f"    because      {r}" for r in rec["reasons"]]
        lines += [f"  warning        {w}" for w in rec["warnings"]]
    return lines


def _config_lines(result: dict[str, Any]) -> list[str]:
    """Ready-to-paste configuration in the words of the tool that made the adapter."""
    peft = result["peft"]
    fmt = result["format"]
    if fmt in ("peft", "diffusers-peft", "torchtune", "gguf", "peft-loha", "peft-lokr"):  # LoHa / LoKr: as resize writes it
        args = ", ".join(f"{key}={value!r}" for key, value in peft.items())
        lines = [f"  PEFT           LoraConfig({args})"]
        if fmt == "gguf":  # convert_lora_to_gguf.py makes GGUF adapters from PEFT ones
            lines.append("  GGUF           train with this LoraConfig and convert it, or `rankscope resize` this file: "
                         "it writes a GGUF adapter at these ranks")
        return lines
    if fmt == "mlx":
        scale = peft["lora_alpha"] / peft["r"]
        return [f"  mlx-lm         \"lora_parameters\": {{\"rank\": {peft['r']}, \"scale\": {scale:g}}}   "
                "(mlx-lm takes one rank for all modules; rank_pattern below is per module)",
                f"  rank_pattern   {peft['rank_pattern']!r}"]
    rows = result["modules"]
    if fmt == "peft-enable-lora":  # PEFT 0.2's MergedLinear: one r for every module, no rank_pattern
        r = max(row["suggested"] for row in rows)
        scales = {row["scale"] for row in rows}
        alpha = f"{scales.pop() * r:g}" if len(scales) == 1 else "scale·r"
        return [f"  PEFT 0.2       r={r}, lora_alpha={alpha} (enable_lora adapters take one r for all modules: the largest "
                "suggested; rankscope resize writes it with the smaller ranks zero-padded)"]
    if fmt in ("lora-diffusion", "lora-vit"):  # no alpha: the rank alone (lora_diffusion keeps it in `<name>:rank`)
        ranks = {row["name"]: row["suggested"] for row in rows}
        if len(set(ranks.values())) == 1:
            return [f"  ranks          all {len(ranks)} modules: rank {next(iter(ranks.values()))}"]
        return ["  ranks          " + ", ".join(f"{name}: {k}" for name, k in ranks.items())]
    kohya = result["kohya"]
    if len({(v["rank"], v["alpha"]) for v in kohya.values()}) == 1:
        v = next(iter(kohya.values()))
        return [f"  kohya          all {len(kohya)} modules: network_dim {v['rank']}, network_alpha {v['alpha']:g}"]
    return ["  kohya          " + ", ".join(f"{name}: dim {v['rank']} alpha {v['alpha']:g}" for name, v in kohya.items())]



def suggest_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary: the rule, the per-module and global ranks with their errors, ready-to-paste configs."""
    rows = result["modules"]
    ks = [row["suggested"] for row in rows]
    energy, err = result["energy"], result["error"]
    k = result["energy_ranks"]
    lines = [f"suggest: {result['path']} ({result['format']}, {len(rows)} modules, r = {result['current_r']}) for "
             f"{energy:.0%} of ΔW's energy",
             f"  energy ranks   median {k['median']:g} (range {k['min']:g}–{k['max']:g}) directions hold {energy:.0%}; "
             f"k = r in {result['full_rank_modules']} of {len(rows)} modules",
             f"  suggested      rank per module median {np.median(ks):g} (range {min(ks)}–{max(ks)}); relative "
             f"Frobenius error median {err['per_module']['median']:.3f}, worst {err['per_module']['max']:.3f}",
             f"  global r       {result['global_r']} ({result['advice']} than r = {result['current_r']})"
             if result["advice"] != "keep" else f"  global r       {result['global_r']} (keep r = {result['current_r']})"]
    lines[-1] += (f"; one uniform r = {result['global_r']} gives error median {err['at_global_r']['median']:.3f}, "
                  f"worst {err['at_global_r']['max']:.3f}")
    lines += [f"  because        {reason}" for reason in result["reasons"]]
    lines += [f"  note           {note}" for note in result["notes"]]
    return lines + _config_lines(result)


def _run_band(band: dict[str, float]) -> str:
    """A band as three decimals, or n/a when its median is not finite."""
    if not math.isfinite(band["median"]):
        return "n/a"
    return f"{band['median']:.3f} (IQR {band['q25']:.3f}–{band['q75']:.3f})"



def _cost(curves: dict[str, Any], drop: float) -> str:
    """Accuracies in [0, 1] read best as points, as ``rankscope sweep`` prints them."""
    baseline = curves["baseline"]
    if curves["metric"] == "accuracy" and baseline is not None and -1e-9 <= baseline <= 1 + 1e-9:
        return f"{drop * 100:.3g} points"
    return f"{drop:.3g}"



def _sweep_line(curves: dict[str, Any]) -> str | None:
    """Cost of pruning the most and least important ranks at the fraction nearest one half."""
    parts = []
    for order in ("most", "least"):
        drop = curves["drops"].get(order)
        inner = [f for f in (drop["fraction"] if drop else []) if 0 < f < 1]
        if inner:
            f = min(inner, key=lambda x: (abs(x - 0.5), x))
            parts.append(f"{order} important {f * 100:.0f}% costs {_cost(curves, drop['drop'][drop['fraction'].index(f)])}")
    if not parts:
        return None
    return f"  sweep  {curves['label']}: pruning the " + "; the ".join(parts) + f" ({curves['metric']})"



def compare_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary: one line per run, one per test, the sweeps' costs, the verdict."""
    runs = result["runs"]
    width = max(len(r["label"]) for r in runs)
    lines = [f"rankscope compare: {len(runs)} runs, last snapshot of each"]
    for r in runs:
        skipped = f", {r['modules_skipped']} without importance" if r["modules_skipped"] else ""
        lines.append(f"  run    {r['label']:<{width}}  {r['modules']} modules{skipped}  {ranks_text(r)}")
        lines.append(f"         per-rank  eff. rank / r {_run_band(r['effective_rank_ratio'])}  "
                     f"top-10% share {_run_band(r['top10_share'])}  gini {_run_band(r['gini'])}")
        if r["spectral_modules"]:
            lines.append(f"         spectral  k95 / r {_run_band(r['energy_rank_ratio'])}  "
                         f"stable rank / r {_run_band(r['stable_rank_ratio'])}  "
                         f"spectral eff. rank / r {_run_band(r['spectral_effective_rank_ratio'])}")
    for t in result["tests"]:
        for metric, (words, _, view) in METRICS.items():
            if metric not in t:
                continue
            s = t[metric]
            side = "more even" if view == "per-rank" else "uses more of its rank"
            who = f"{s['more_even']} {side}" if s["more_even"] else "same median"
            sig = "" if s["significant"] else ", not significant"
            lines.append(f"  test   {t['a']} vs {t['b']}  {view} {words}: U = {s['statistic']:.1f}, "
                         f"p = {p_text(s['p_value'])}, n = {s['n_a']}/{s['n_b']} -> {who}{sig}")
    for curves in (result.get("sweeps") or {}).get("runs", []):
        line = _sweep_line(curves)
        if line:
            lines.append(line)
    v = result["verdict"]
    lines.append(f"  verdict  per-rank view (slot norms): {v['per_rank_sentence']}")
    if v.get("spectral"):
        lines.append(f"  verdict  spectral view (ΔW, basis-independent): {v['spectral']['sentence']}")
    return lines


__all__ = ["summary_lines", "directions_line", "dynamics_summary_lines", "suggest_lines", "compare_lines",
           "PER_RANK_HEADER", "SPECTRAL_HEADER"]
