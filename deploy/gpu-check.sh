#!/usr/bin/env bash
# GPU truth check: on a machine with an NVIDIA GPU, compare what `sov-agent scan --json` sees
# (devices, memory, utilisation, the processes on each GPU and their containers) with what
# nvidia-smi says, and print ONE verdict line:
#   GPU-CHECK PASS devices=2 processes=3 (…)
#   GPU-CHECK FAIL <reason>; <reason>; …
# Exit status: 0 pass, 1 mismatch, 2 cannot compare (no nvidia-smi, no GPU, no agent, no python3).
#
#   deploy/gpu-check.sh                        # sov-agent from PATH, else target/{release,debug}
#   SOV_AGENT=/usr/local/bin/sov-agent deploy/gpu-check.sh
#
# Run it whenever a machine with a GPU is available, and record the verdict line (with the
# driver version it prints) in docs/PERFORMANCE.md. Utilisation and memory move between the two
# readings, so they are compared with tolerances (utilisation ±20 points, used memory ±5 % or
# 256 MiB); totals, UUIDs and the set of compute processes must match exactly.
set -uo pipefail
cd "$(dirname "$0")/.."

verdict() { echo "GPU-CHECK $*"; }

NVIDIA_SMI="${NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$NVIDIA_SMI" >/dev/null 2>&1; then
  verdict "FAIL cannot compare: no nvidia-smi on this machine (no NVIDIA driver installed)"
  exit 2
fi
if ! command -v python3 >/dev/null 2>&1; then
  verdict "FAIL cannot compare: python3 is needed to read the JSON"
  exit 2
fi
agent="${SOV_AGENT:-}"
if [ -z "$agent" ]; then
  for candidate in "$(command -v sov-agent || true)" target/release/sov-agent target/debug/sov-agent; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then agent="$candidate"; break; fi
  done
fi
if [ -z "$agent" ] || [ ! -x "$agent" ]; then
  verdict "FAIL cannot compare: no sov-agent binary (set SOV_AGENT or cargo build -p sov-agent)"
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if ! "$NVIDIA_SMI" --query-gpu=index,uuid,name,pci.bus_id,memory.used,memory.total,utilization.gpu,utilization.memory,driver_version \
      --format=csv,noheader,nounits >"$work/gpus.csv" 2>"$work/smi.err"; then
  verdict "FAIL cannot compare: nvidia-smi --query-gpu failed: $(head -c 300 "$work/smi.err" | tr '\n' ' ')"
  exit 2
fi
if ! "$NVIDIA_SMI" --query-compute-apps=gpu_uuid,pid,used_memory,process_name \
      --format=csv,noheader,nounits >"$work/apps.csv" 2>>"$work/smi.err"; then
  verdict "FAIL cannot compare: nvidia-smi --query-compute-apps failed: $(head -c 300 "$work/smi.err" | tr '\n' ' ')"
  exit 2
fi
if ! "$agent" scan --json --no-hash --window-ms 2000 >"$work/scan.json" 2>"$work/scan.err"; then
  verdict "FAIL cannot compare: $agent scan failed: $(tail -c 300 "$work/scan.err" | tr '\n' ' ')"
  exit 2
fi

python3 - "$work/gpus.csv" "$work/apps.csv" "$work/scan.json" <<'PY'
import csv, json, sys

MIB = 1 << 20
gpus_csv, apps_csv, scan_json = sys.argv[1:4]
problems, notes = [], []

def rows(path):
    with open(path) as f:
        return [[c.strip() for c in r] for r in csv.reader(f) if r and any(c.strip() for c in r)]

def num(s):
    try:
        return float(s)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"

smi = {}
driver = ""
for r in rows(gpus_csv):
    if len(r) < 9:
        continue
    idx, uuid, name, bus, used, total, ugpu, umem, driver = r[:9]
    smi[uuid] = dict(index=int(idx), name=name, bus=bus, used=num(used), total=num(total),
                     ugpu=num(ugpu), umem=num(umem))
apps = set()
app_mem = {}
for r in rows(apps_csv):
    if len(r) < 3:
        continue
    uuid, pid, used = r[0], int(r[1]), num(r[2])
    apps.add((uuid, pid))
    app_mem[(uuid, pid)] = used

scan = json.load(open(scan_json))
gpu = scan.get("gpu", {})
if not smi:
    print("GPU-CHECK FAIL cannot compare: nvidia-smi lists no GPU")
    sys.exit(2)
if gpu.get("state") != "ok":
    print(f"GPU-CHECK FAIL agent sees no GPU ({gpu.get('reason', '')!r}) but nvidia-smi lists {len(smi)}")
    sys.exit(1)
agent = {d["uuid"]: d for d in gpu.get("devices", [])}
if set(agent) != set(smi):
    problems.append(f"GPU UUIDs differ: agent {sorted(agent)} vs nvidia-smi {sorted(smi)}")
if driver and gpu.get("driver_version") and gpu["driver_version"] != driver:
    problems.append(f"driver {gpu['driver_version']} vs {driver}")
for uuid in sorted(set(agent) & set(smi)):
    a, s = agent[uuid], smi[uuid]
    label = f"GPU {s['index']}"
    if a.get("index") != s["index"]:
        problems.append(f"{label}: index {a.get('index')} vs {s['index']}")
    if s["total"] is not None and abs(a["memory_total_bytes"] / MIB - s["total"]) > 1:
        problems.append(f"{label}: memory total {a['memory_total_bytes'] / MIB:.0f} MiB vs {s['total']:.0f} MiB")
    if s["used"] is not None:
        au = a["memory_used_bytes"] / MIB
        if abs(au - s["used"]) > max(256, 0.05 * s["used"]):
            problems.append(f"{label}: memory used {au:.0f} MiB vs {s['used']:.0f} MiB")
    if s["ugpu"] is not None and abs(a["utilization_gpu_percent"] - s["ugpu"]) > 20:
        problems.append(f"{label}: utilisation {a['utilization_gpu_percent']} % vs {s['ugpu']:.0f} %")
    if s["bus"] and a.get("pci_bus_id") and a["pci_bus_id"].lower() != s["bus"].lower():
        problems.append(f"{label}: PCI bus {a['pci_bus_id']} vs {s['bus']}")

seen = set()
containers = 0
for d in gpu.get("devices", []):
    for p in d.get("processes", []):
        if p.get("kind", "compute") != "compute":
            continue
        key = (d["uuid"], p["pid"])
        seen.add(key)
        if p.get("container"):
            containers += 1
            c = p["container"]
            who = c.get("pod_name") and f"{c.get('pod_namespace')}/{c.get('pod_name')}" or c.get("id", "")[:12]
            notes.append(f"pid {p['pid']} in {who}")
        want = app_mem.get(key)
        if want is not None and abs(p["used_memory_bytes"] / MIB - want) > max(64, 0.05 * want):
            problems.append(f"pid {p['pid']}: GPU memory {p['used_memory_bytes'] / MIB:.0f} MiB vs {want:.0f} MiB")
missing = apps - seen
extra = seen - apps
if missing:
    problems.append("processes nvidia-smi lists that the agent does not: " + ", ".join(f"pid {p} on {u}" for u, p in sorted(missing)))
if extra:
    problems.append("processes the agent lists that nvidia-smi does not: " + ", ".join(f"pid {p} on {u}" for u, p in sorted(extra)))

if problems:
    print("GPU-CHECK FAIL " + "; ".join(problems))
    sys.exit(1)
extra_notes = f" ({'; '.join(notes)})" if notes else ""
print(f"GPU-CHECK PASS devices={len(smi)} processes={len(apps)} in_containers={containers} driver={driver}{extra_notes}")
PY
