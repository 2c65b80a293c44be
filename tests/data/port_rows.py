"""Every row of the DCE 5.0 port document (port-requirements.zh.md / .en.md) as test data.

Copied by hand from the document so that the tests never read ../shared. One tuple per table
row and protocol: (section, proto, port or None, description as written in the document).
"TCP/UDP" rows appear once per protocol; IP-in-IP and ICMP rows have no port.
"""

ROWS: list[tuple[str, str, int | None, str]] = [
    # Bootstrap node
    ("bootstrap", "tcp", 443, "Docker Registry"),
    ("bootstrap", "tcp", 8081, "Chart Museum"),
    ("bootstrap", "tcp", 9000, "MinIO API"),
    ("bootstrap", "tcp", 9001, "MinIO UI"),
    # Kubernetes control plane
    ("control-plane", "tcp", 2379, "etcd client port"),
    ("control-plane", "tcp", 2380, "etcd peer port"),
    ("control-plane", "tcp", 2381, "etcd metrics port"),
    ("control-plane", "tcp", 6443, "Kubernetes API"),
    ("control-plane", "tcp", 10250, "kubelet API"),
    ("control-plane", "tcp", 10257, "kube-scheduler (as written in the source)"),
    ("control-plane", "tcp", 10259, "kube-controller-manager (as written in the source)"),
    # Every Kubernetes node
    ("node", "tcp", 22, "ssh, for Ansible"),
    ("node", "tcp", 9100, "node exporter (Insight agent)"),
    ("node", "tcp", 10250, "kubelet API"),
    *[("node", "tcp", p, "Kubernetes NodePort range") for p in (30000, 31000, 32767)],
    # Calico
    ("calico", "tcp", 179, "Calico networking (BGP)"),
    ("calico", "udp", 4789, "Calico CNI with VXLAN enabled"),
    ("calico", "tcp", 5473, "Calico CNI with Typha enabled"),
    ("calico", "udp", 51820, "Calico with IPv4 WireGuard enabled"),
    ("calico", "udp", 51821, "Calico with IPv6 WireGuard enabled"),
    ("calico", "ipip", None, "Calico CNI with IPIP enabled"),
    # MetalLB
    ("metallb", "tcp", 7472, "MetalLB metrics"),
    ("metallb", "udp", 7472, "MetalLB metrics"),
    ("metallb", "tcp", 7946, "MetalLB L2 operating mode (memberlist)"),
    ("metallb", "udp", 7946, "MetalLB L2 operating mode (memberlist)"),
    # Cilium
    ("cilium", "tcp", 4240, "Cilium health checks (cilium-health)"),
    ("cilium", "tcp", 4244, "Hubble server"),
    ("cilium", "tcp", 4245, "Hubble Relay"),
    ("cilium", "udp", 8472, "VXLAN overlay"),
    ("cilium", "tcp", 9962, "cilium-agent Prometheus metrics"),
    ("cilium", "tcp", 9963, "cilium-operator Prometheus metrics"),
    ("cilium", "tcp", 9964, "cilium-proxy Prometheus metrics"),
    ("cilium", "udp", 51871, "WireGuard encryption tunnel endpoint"),
    ("cilium", "icmp", None, "health checks"),
    # SpiderPool
    ("spiderpool", "tcp", 5710, "SpiderPool agent HTTP server"),
    ("spiderpool", "tcp", 5711, "SpiderPool agent metrics"),
    ("spiderpool", "tcp", 5712, "SpiderPool agent gops"),
    ("spiderpool", "tcp", 5720, "SpiderPool controller HTTP server"),
    ("spiderpool", "tcp", 5721, "SpiderPool controller metrics"),
    ("spiderpool", "tcp", 5722, "SpiderPool controller webhook"),
    ("spiderpool", "tcp", 5723, "spiderpool-cli HTTP server"),
    ("spiderpool", "tcp", 5724, "SpiderPool controller gops"),
    # KubeVIP
    ("kube-vip", "tcp", 2112, "kube-vip metrics"),
    # Global service cluster: Istio gateway VIP, Insight VIP
    ("istio", "tcp", 80, "Istio gateway HTTP"),
    ("istio", "tcp", 443, "Istio gateway HTTPS"),
    ("insight", "tcp", 8480, "Insight VIP for metrics"),
    ("insight", "tcp", 9200, "Insight VIP for logs"),
    ("insight", "tcp", 4317, "Insight VIP for traces"),
    ("insight", "tcp", 8006, "Insight VIP for audit logs"),
    # Worker clusters
    ("worker", "tcp", 22, "ssh on every node (for Ansible)"),
    ("worker", "tcp", 6443, "Kubernetes API entry (for example its VIP)"),
    # Other products: image registry
    ("registry", "tcp", 443, "entry point (for example its VIP)"),
]

# Per section: who opens the port (the catalog's dst_role) and who uses it (src_roles).
SECTION_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bootstrap": (("bootstrap",), ("node",)),
    "control-plane": (("control_plane", "etcd", "node"), ("node",)),
    "node": (("node",), ("node",)),
    "calico": (("node",), ("node",)),
    "metallb": (("node",), ("node",)),
    "cilium": (("node",), ("node",)),
    "spiderpool": (("node",), ("node",)),
    "kube-vip": (("control_plane",), ("node",)),
    "istio": (("vip:istio_gateway",), ("scanner",)),
    "insight": (("vip:insight",), ("node",)),
    "worker": (("node", "vip:kube_api"), ("global",)),
    "registry": (("vip:registry",), ("node",)),
}
