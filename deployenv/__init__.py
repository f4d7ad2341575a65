"""`rackboot build deploy-env` and `rackboot build image`: the deploy kernel and initramfs, and images to deploy, built from
Debian packages (a CLI plugin).

The appliance never imports this package: it plugs into `rackboot` through the `rackboot.commands` entry
point group, like the vm-testbed. Of the project it imports only `broadcast` (the agent's key helper).
"""
