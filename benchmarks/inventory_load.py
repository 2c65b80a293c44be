"""How long reading a kubespray inventory folder takes: `load_site` on N hosts.

Writes a kubespray-shaped folder per size (inventory.ini without a k8s_cluster section, three
control-plane/etcd nodes, the rest kube_node; group_vars/all/*.yml and group_vars/k8s_cluster/
*.yml with the plan-deciding variables and an air-gap registry; one host_vars file per tenth
host) and times ``load_site([folder])`` in this process, the median of ``--repeat`` runs (the
first import is not counted). Every host's variables are merged as Ansible merges them and the
plan-deciding ones compared across nodes (scanner/plan/ansible_vars.py), so this is the cost of
issue 13's per-host reading.

    python benchmarks/inventory_load.py --hosts 1000,10000 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_layout(folder: Path, n: int) -> None:
    lines = ["[kube_control_plane]"]
    addr = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(n)]
    lines += [f"node{i} ansible_host={addr[i]} ip={addr[i]}" for i in range(3)]
    lines += ["", "[etcd:children]", "kube_control_plane", "", "[kube_node]"]
    lines += [f"node{i} ansible_host={addr[i]}" for i in range(3, n)]
    (folder / "inventory.ini").write_text("\n".join(lines) + "\n")
    gv = folder / "group_vars"
    (gv / "all").mkdir(parents=True)
    (gv / "k8s_cluster").mkdir()
    (gv / "all" / "offline.yml").write_text(
        'registry_host: "198.18.200.5:5000"\nfiles_repo: "http://198.18.200.6:9000/kubean"\n'
        'kube_image_repo: "{{ registry_host }}/registry.k8s.io"\n'
        'github_url: "{{ files_repo }}/github.com"\n'
    )
    (gv / "k8s_cluster" / "k8s-net-calico.yml").write_text("calico_network_backend: bird\n")
    (gv / "k8s_cluster" / "k8s-cluster.yml").write_text(
        "kube_network_plugin: calico\nkube_proxy_mode: ipvs\n"
        + "".join(f"unrelated_{i}: value{i}\n" for i in range(200))
    )
    hv = folder / "host_vars"
    hv.mkdir()
    for i in range(3, n, 10):
        (hv / f"node{i}.yml").write_text(f"ip: {addr[i]}\nnode_labels: {{rack: r{i % 7}}}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="1000,10000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from scanner.plan.inventory import load_site

    print("hosts  median_s  min_s  max_s")
    for n in (int(x) for x in args.hosts.split(",")):
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "mycluster"
            folder.mkdir()
            write_layout(folder, n)
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                site = load_site([str(folder)])
                times.append(time.perf_counter() - t)
            assert len(site.hosts()) == n
            print(f"{n:5d}  {statistics.median(times):8.3f}  {min(times):5.3f}  {max(times):5.3f}")


if __name__ == "__main__":
    main()
