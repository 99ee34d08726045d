//! The policy snapshot: vnets, VMs, compiled security groups and VIPs, as the
//! workers read it. Built whole by the control thread and published
//! atomically; never changed in place.

use dataplane::MacAddr;
use filter::{CompiledNsg, DefaultContext, NsgSpec};
use ipnet::IpNet;
use lb::balancer::{Vip, VipConfig, Vips};
use lb::conntrack::to16;
use std::collections::HashMap;
use std::net::IpAddr;

/// A vnet as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnetDef {
    /// Name.
    pub name: String,
    /// Address prefixes.
    pub prefixes: Vec<IpNet>,
    /// The MAC the switch answers ARP with and sends from.
    pub gateway_mac: MacAddr,
}

/// A VM as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDef {
    /// Name.
    pub name: String,
    /// Index of its switch port.
    pub port: u16,
    /// Index of its vnet in the topology.
    pub vnet: usize,
    /// Its MAC.
    pub mac: MacAddr,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Index of its security group, if any.
    pub nsg: Option<usize>,
    /// A switch-internal endpoint (the health prober): its addresses may lie
    /// outside the vnet, and the ARP responder answers it for any address
    /// (its gateway is outside the vnet too).
    pub internal: bool,
}

/// A VIP as given to [`Policy::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipDef {
    /// Index of the vnet it serves.
    pub vnet: usize,
    /// The load balancer configuration.
    pub config: VipConfig,
    /// Initial health per backend (missing = healthy).
    pub health: Vec<bool>,
}

/// Everything the switch needs to know, before compilation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// Vnets.
    pub vnets: Vec<VnetDef>,
    /// VMs.
    pub vms: Vec<VmDef>,
    /// Security groups.
    pub nsgs: Vec<NsgSpec>,
    /// VIPs.
    pub vips: Vec<VipDef>,
    /// Number of switch ports.
    pub ports: u16,
}

/// A vnet in the snapshot.
#[derive(Debug, Clone)]
pub struct Vnet {
    /// Name.
    pub name: String,
    /// Prefixes.
    pub prefixes: Vec<IpNet>,
    /// Gateway MAC.
    pub gateway_mac: MacAddr,
    /// Its VIPs.
    pub vips: Vips,
}

impl Vnet {
    /// True when `ip` is inside the vnet.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.prefixes.iter().any(|n| n.contains(ip))
    }
}

/// A VM in the snapshot: its definition, with `nsg` indexing
/// [`Policy::nsgs`] (the group compiled for the VM's vnet) instead of the
/// topology's groups.
pub type Vm = VmDef;

/// Why a topology could not be compiled (one line per problem).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct PolicyError(pub Vec<String>);

/// An immutable policy snapshot.
#[derive(Debug)]
pub struct Policy {
    /// Increases with every published snapshot.
    pub generation: u64,
    /// Vnets (index = vnet id).
    pub vnets: Vec<Vnet>,
    /// VMs (index = VM id).
    pub vms: Vec<Vm>,
    /// Compiled security groups (one per (group, vnet) pair that VMs use).
    pub nsgs: Vec<CompiledNsg>,
    port_vm: Vec<Option<usize>>,
    addr_vm: HashMap<(usize, [u8; 16]), usize>,
}

impl Policy {
    /// Compiles a topology into snapshot `generation`; every problem is reported.
    pub fn compile(t: &Topology, generation: u64) -> Result<Policy, PolicyError> {
        let mut errs = Vec::new();
        let mut vnets: Vec<Vnet> = t
            .vnets
            .iter()
            .map(|v| Vnet {
                name: v.name.clone(),
                prefixes: v.prefixes.clone(),
                gateway_mac: v.gateway_mac,
                vips: Vips::new(),
            })
            .collect();
        for v in &t.vips {
            match vnets.get_mut(v.vnet) {
                Some(vn) => match Vip::new(v.config.clone(), &v.health) {
                    Ok(vip) => {
                        vn.vips.insert(vip);
                    }
                    Err(e) => errs.push(e.to_string()),
                },
                None => errs.push(format!("vip {:?}: no vnet #{}", v.config.name, v.vnet)),
            }
        }
        // A group is compiled per vnet: its defaults name the vnet's prefixes.
        let mut nsgs = Vec::new();
        let mut nsg_index: HashMap<(usize, usize), usize> = HashMap::new();
        let mut port_vm = vec![None; usize::from(t.ports)];
        let mut addr_vm = HashMap::new();
        let mut vms = Vec::new();
        for (i, vm) in t.vms.iter().enumerate() {
            let Some(vn) = t.vnets.get(vm.vnet) else {
                errs.push(format!("vm {:?}: no vnet #{}", vm.name, vm.vnet));
                continue;
            };
            match port_vm.get_mut(usize::from(vm.port)) {
                Some(slot @ None) => *slot = Some(i),
                Some(Some(_)) => errs.push(format!(
                    "vm {:?}: port #{} already has a vm",
                    vm.name, vm.port
                )),
                None => errs.push(format!("vm {:?}: no port #{}", vm.name, vm.port)),
            }
            for ip in &vm.ips {
                if addr_vm.insert((vm.vnet, to16(*ip)), i).is_some() {
                    errs.push(format!(
                        "vm {:?}: {ip} is used twice in vnet {:?}",
                        vm.name, vn.name
                    ));
                }
            }
            let nsg = match vm.nsg {
                None => None,
                Some(g) => match nsg_index.get(&(g, vm.vnet)) {
                    Some(&c) => Some(c),
                    None => match t.nsgs.get(g) {
                        None => {
                            errs.push(format!("vm {:?}: no nsg #{g}", vm.name));
                            None
                        }
                        Some(spec) => match filter::compile_nsg(
                            spec,
                            &DefaultContext::for_vnet(vn.prefixes.clone()),
                        ) {
                            Ok(c) => {
                                nsgs.push(c);
                                nsg_index.insert((g, vm.vnet), nsgs.len() - 1);
                                Some(nsgs.len() - 1)
                            }
                            Err(es) => {
                                errs.extend(es.iter().map(|e| e.to_string()));
                                None
                            }
                        },
                    },
                },
            };
            vms.push(VmDef { nsg, ..vm.clone() });
        }
        if !errs.is_empty() {
            return Err(PolicyError(errs));
        }
        Ok(Policy {
            generation,
            vnets,
            vms,
            nsgs,
            port_vm,
            addr_vm,
        })
    }

    /// The VM attached to `port`.
    #[inline]
    pub fn vm_on_port(&self, port: u16) -> Option<(usize, &Vm)> {
        let i = (*self.port_vm.get(usize::from(port))?)?;
        Some((i, self.vms.get(i)?))
    }

    /// The VM with address `ip` (16-byte form) in vnet `vnet`.
    #[inline]
    pub fn vm_by_addr(&self, vnet: usize, ip: [u8; 16]) -> Option<(usize, &Vm)> {
        let i = *self.addr_vm.get(&(vnet, ip))?;
        Some((i, self.vms.get(i)?))
    }

    /// A copy of this snapshot as generation `generation` with the health of
    /// a VIP's backend changed (a new Maglev table).
    pub fn with_health(
        &self,
        vnet: usize,
        vip: (IpAddr, u16, u8),
        backend: usize,
        healthy: bool,
        generation: u64,
    ) -> Result<Policy, PolicyError> {
        let mut vnets = self.vnets.clone();
        let vn = vnets
            .get_mut(vnet)
            .ok_or_else(|| PolicyError(vec![format!("no vnet #{vnet}")]))?;
        vn.vips
            .set_health(vip, backend, healthy)
            .map_err(|e| PolicyError(vec![e.to_string()]))?;
        Ok(Policy {
            generation,
            vnets,
            vms: self.vms.clone(),
            nsgs: self.nsgs.clone(),
            port_vm: self.port_vm.clone(),
            addr_vm: self.addr_vm.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, port: u16, vnet: usize, ip: &str) -> VmDef {
        VmDef {
            name: name.into(),
            port,
            vnet,
            mac: MacAddr([2, 0, 0, 0, 0, port as u8 + 1]),
            ips: vec![ip.parse().unwrap()],
            nsg: None,
            internal: false,
        }
    }

    fn topo() -> Topology {
        let vnet = |n: &str| VnetDef {
            name: n.into(),
            prefixes: vec!["10.1.0.0/16".parse().unwrap()],
            gateway_mac: MacAddr([0x12, 0, 0, 0, 0, 1]),
        };
        Topology {
            vnets: vec![vnet("a"), vnet("b")],
            vms: vec![vm("x", 0, 0, "10.1.0.4"), vm("y", 1, 1, "10.1.0.4")],
            nsgs: vec![],
            vips: vec![],
            ports: 3,
        }
    }

    #[test]
    fn lookups_are_per_vnet() {
        let p = Policy::compile(&topo(), 7).unwrap();
        assert_eq!(p.generation, 7);
        let ip = to16("10.1.0.4".parse().unwrap());
        assert_eq!(p.vm_by_addr(0, ip).unwrap().1.name, "x");
        assert_eq!(p.vm_by_addr(1, ip).unwrap().1.name, "y");
        assert_eq!(p.vm_on_port(1).unwrap().1.name, "y");
        assert!(p.vm_on_port(2).is_none());
        assert!(p.vm_on_port(9).is_none());
    }

    #[test]
    fn every_problem_is_reported() {
        let mut t = topo();
        t.vms.push(vm("z", 0, 0, "10.1.0.4"));
        t.vms.push(vm("w", 9, 5, "10.1.0.9"));
        t.vms[0].nsg = Some(3);
        let e = Policy::compile(&t, 1).unwrap_err();
        let text = e.0.join("\n");
        assert!(
            text.contains("vm \"z\": port #0 already has a vm"),
            "{text}"
        );
        assert!(
            text.contains("vm \"z\": 10.1.0.4 is used twice in vnet \"a\""),
            "{text}"
        );
        assert!(text.contains("vm \"w\": no vnet #5"), "{text}");
        assert!(text.contains("vm \"x\": no nsg #3"), "{text}");
    }
}
