//! The DPDK end-to-end tests' topology: a client VM and a DIP VM on
//! `net_vhost` ports, a UDP VIP 10.1.0.100:80 balancing to the DIP's 8080.
#![allow(dead_code)]

/// pollux's configuration for it: EAL on core 1 without huge pages, file
/// prefix `prefix`, the client and DIP ports on `client` and `dip` devargs.
pub fn vip_config(prefix: &str, client: &str, dip: &str) -> String {
    format!(
        r#"[dpdk]
eal_args = ["--no-huge", "--no-pci", "-m", "512", "-l", "1", "--log-level=error", "--file-prefix={prefix}"]
[[port]]
name = "client"
driver = "dpdk"
devargs = "{client}"
[[port]]
name = "dip1"
driver = "dpdk"
devargs = "{dip}"
[[vnet]]
name = "a"
prefixes = ["10.1.0.0/16"]
gateway_mac = "12:34:56:78:9a:bc"
[[vm]]
name = "client"
port = "client"
vnet = "a"
mac = "02:00:00:00:00:20"
ips = ["10.1.0.20"]
[[vm]]
name = "dip1"
port = "dip1"
vnet = "a"
mac = "02:00:00:00:00:04"
ips = ["10.1.0.4"]
[[vip]]
name = "web"
vnet = "a"
address = "10.1.0.100"
port = 80
protocol = "udp"
backends = [ {{ vm = "dip1", port = 8080 }} ]
"#
    )
}
