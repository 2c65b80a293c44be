"""The inputs and the plan: targets, Ansible inventories (inventory_files), Kubean
ConfigMaps and kubespray variables (kubean), sites and selection options, and the lazy planner
(catalog x inventory -> flows). Pure: no I/O but reading files.

May import: core, catalog.
"""
