"""Print Markdown tables of bench JSON lines with our ratio to each peer measured in the run."""

import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
steps = [r for r in rows if "pairs_per_s" in r]
samples = [r for r in rows if "images_per_s" in r]


def _name(r):
  if r.get("impl") == "scdpo-jax":
    extra = f" remat={r['remat']}" if "remat" in r else ""
    return f"scdpo-jax attn={r.get('attention')}{extra}"
  return "torch.compile" if r.get("compile") else "torch diffusers"


if steps:
  peers = {_name(r): r for r in steps if r.get("impl") == "torch-diffusers"}
  print("| train step | pairs | pairs/s | step s | peak GiB | compile s | MFU | "
        + " | ".join(f"x {k}" for k in peers) + " |")
  print("|" + " --- |" * (7 + len(peers)))
  for r in steps:
    mfu = r.get("mfu", r.get("mfu_vs_989"))
    ratios = [f"{r['pairs_per_s'] / p['pairs_per_s']:.2f}" for p in peers.values()]
    print(f"| {_name(r)} | {r['pairs']} | {r['pairs_per_s']} | {r['step_s']} | "
          f"{r['peak_GiB']} | {r.get('compile_s', '-')} | {mfu} | " + " | ".join(ratios) + " |")
if samples:
  peers = {_name(r): r for r in samples if r.get("impl") == "torch-diffusers"}
  print("\n| sampling | batch | steps | size | images/s | s/batch | first call s | "
        + " | ".join(f"x {k}" for k in peers) + " |")
  print("|" + " --- |" * (7 + len(peers)))
  for r in samples:
    ratios = [f"{r['images_per_s'] / p['images_per_s']:.2f}" for p in peers.values()]
    print(f"| {_name(r)} | {r['batch']} | {r['steps']} | {r['size']} | {r['images_per_s']} | "
          f"{r['s_per_batch']} | {r['first_call_s']} | " + " | ".join(ratios) + " |")
