//! Flow queries from the control thread: listing and deleting flows, and
//! per-backend connection counts, served by each worker between bursts.

use super::Switch;
use crossbeam_queue::ArrayQueue;
use dataplane::PacketBuf;

/// A control request to one worker about its flow table.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    /// Echoed in the reply.
    pub id: u64,
    /// Which flows.
    pub filter: crate::flow::FlowFilter,
    /// Remove them (else list them).
    pub delete: bool,
    /// With `delete`: forget their connections too, so that their next
    /// packets are judged by the current rules as new connections (and a
    /// load-balanced one may get another backend).
    pub reset: bool,
    /// List at most this many.
    pub limit: usize,
    /// Instead: report the load balancer's per-backend counters.
    pub backends: bool,
}

/// A worker's answer to a [`FlowRequest`].
#[derive(Debug, Clone)]
pub struct FlowReply {
    /// The request's id.
    pub id: u64,
    /// Matching flows (listing), at most the limit.
    pub flows: Vec<crate::flow::FlowInfo>,
    /// Matching flows in all (listing: beyond the limit too; deleting: removed).
    pub matched: usize,
    /// The worker's table occupancy after the request.
    pub occupancy: usize,
    /// Per-backend counters (when asked for).
    pub backends: Vec<(lb::balancer::BackendKey, lb::balancer::BackendCounts)>,
}

/// A worker's control mailbox: the control thread posts requests, the
/// worker answers between bursts (never per packet; one request per poll).
#[derive(Debug)]
pub struct FlowControl {
    /// Requests to the worker.
    pub requests: ArrayQueue<FlowRequest>,
    /// Replies from the worker.
    pub replies: ArrayQueue<FlowReply>,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            requests: ArrayQueue::new(16),
            replies: ArrayQueue::new(16),
        }
    }
}

impl<B: PacketBuf> Switch<B> {
    /// Answers one pending flow request, if any.
    pub(super) fn serve_control(&mut self) {
        let Some((worker, c)) = &self.control else {
            return;
        };
        let Some(req) = c.requests.pop() else { return };
        let mut flows = Vec::new();
        let mut backends = Vec::new();
        let matched = if req.backends {
            for l in &self.lb {
                backends.extend(l.backend_counts());
            }
            backends.len()
        } else if req.delete {
            let mut conns = Vec::new();
            let n = self.flows.remove_where(|p, k, e| {
                let m = req.filter.matches(p, k, e);
                if m && req.reset {
                    conns.extend(e.action.lb);
                }
                m
            });
            // The other direction of each connection goes too (it may not
            // match the filter), or it would go on forwarding from the cache.
            let of = |r: &crate::flow::LbRef| (r.vnet, r.conn);
            let gone: std::collections::HashSet<_> = conns.iter().map(of).collect();
            let more = if gone.is_empty() {
                0
            } else {
                self.flows.remove_where(|_, _, e| {
                    e.action.lb.as_ref().is_some_and(|r| gone.contains(&of(r)))
                })
            };
            for r in conns {
                if let Some(l) = self.lb.get_mut(r.vnet as usize) {
                    l.forget(r.conn);
                }
            }
            n + more
        } else {
            let mut n = 0;
            for (p, k, e) in self.flows.iter() {
                if req.filter.matches(p, k, e) {
                    if flows.len() < req.limit {
                        flows.push(crate::flow::FlowInfo {
                            worker: *worker,
                            in_port: p,
                            key: *k,
                            entry: *e,
                            conn: e.action.lb.and_then(|r| {
                                Some(self.lb.get(usize::from(r.vnet))?.conn(r.conn)?.state)
                            }),
                        });
                    }
                    n += 1;
                }
            }
            n
        };
        // The control thread waits for this reply; a full queue means it
        // gave up on earlier ones, which are stale.
        let _ = c.replies.force_push(FlowReply {
            id: req.id,
            flows,
            matched,
            occupancy: self.flows.len(),
            backends,
        });
    }
}
