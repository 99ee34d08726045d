/* What pollux needs from DPDK: the public headers, and functions that export
 * DPDK's static-inline fast path (which bindgen cannot bind) as real symbols. */
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_version.h>
#include <rte_bus_vdev.h>
#include <rte_eth_vhost.h>

uint16_t pollux_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t pollux_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *pollux_pktmbuf_alloc(struct rte_mempool *mp);
int pollux_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **mbufs, unsigned int n);
void pollux_pktmbuf_free(struct rte_mbuf *m);
char *pollux_pktmbuf_append(struct rte_mbuf *m, uint16_t len);
char *pollux_pktmbuf_prepend(struct rte_mbuf *m, uint16_t len);
char *pollux_pktmbuf_adj(struct rte_mbuf *m, uint16_t len);
int pollux_pktmbuf_trim(struct rte_mbuf *m, uint16_t len);
uint16_t pollux_pktmbuf_headroom(const struct rte_mbuf *m);
uint16_t pollux_pktmbuf_tailroom(const struct rte_mbuf *m);
void pollux_pktmbuf_reset(struct rte_mbuf *m);
int pollux_errno(void);
unsigned int pollux_lcore_id(void);
