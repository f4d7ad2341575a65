"""Boot-protocol services: DHCP, TFTP, HTTP/iPXE, DNS and IPv6 router advertisements."""
