"""Print a Markdown table of bench JSON lines with our ratio to each peer measured in the run."""

import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
peers = {("torch.compile" if r.get("compile") else "torch eager"): r for r in rows
         if r.get("impl") == "torch-diffusers" and r.get("pairs") == 8}
print("| implementation | pairs | pairs/s | step s | peak GiB | compile s | MFU | "
      + " | ".join(f"x {k}" for k in peers) + " |")
print("|" + " --- |" * (7 + len(peers)))
for r in rows:
  if r.get("impl") == "scdpo-jax":
    name = f"scdpo-jax attn={r['attention']} remat={r['remat']}"
  else:
    name = "torch.compile" if r.get("compile") else "torch eager"
  mfu = r.get("mfu", r.get("mfu_vs_989"))
  ratios = [f"{r['pairs_per_s'] / p['pairs_per_s']:.2f}" for p in peers.values()]
  print(f"| {name} | {r['pairs']} | {r['pairs_per_s']} | {r['step_s']} | {r['peak_GiB']} | "
        f"{r.get('compile_s', '-')} | {mfu} | " + " | ".join(ratios) + " |")
