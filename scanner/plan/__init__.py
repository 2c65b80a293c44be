"""The inputs and the plan: targets, Ansible inventories (inventory_files, sources, with
group_vars/host_vars and Ansible's precedence in ansible_vars; clusters, inventory, sitefile),
YAML files, Kubernetes objects and ConfigMaps (yamldocs), kubespray variables (kubean) and the
endpoints they name (endpoints),
selection options, and the lazy planner (catalog x inventory -> flows). Pure: no I/O but
reading files.

May import: core, catalog.
"""
