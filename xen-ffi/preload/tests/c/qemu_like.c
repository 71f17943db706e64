/*
 * A stand-in for QEMU 7.2's ioreq-server code, written for ioreq-mux-preload's tests: it
 * makes the Xen library calls QEMU makes, in QEMU's order (create, map_resource of frames
 * 0..2, get_info without gfns, enable, bind every vCPU's vp_eport then the buffered port,
 * claims), then serves requests the way QEMU does (one pending port per wake-up, unmask,
 * READY -> INPROCESS with plain byte stores, drain the buffered ring first, answer,
 * IORESP_READY, notify). It links the real Xen libraries; the preload is put in front of
 * them with LD_PRELOAD. Everything it sees goes to stdout, one fact per line.
 *
 * Usage: qemu_like MODE NR_VCPUS DOMID REQUESTS ANSWERED
 *   MODE qemu     setup, serve REQUESTS requests (answering the first ANSWERED of them),
 *                 then QEMU's exit sequence (disable, destroy, unmap, close)
 *        queue    as qemu, but the first wake-up checks the pending queue (two ports)
 *        handles  as qemu, plus a second event-channel handle that must stay apart
 *        inert    no setup: xenevtchn_open and create, which must reach the real libraries
 * Between the vCPU binds and the buffered bind it prints "vcpus-bound" and waits for a
 * line on stdin.
 */
#define _GNU_SOURCE
#define __XEN_TOOLS__ /* HVM_IOREQSRV_BUFIOREQ_* are tools-only, as QEMU sees them */
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <xendevicemodel.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>

_Static_assert(sizeof(ioreq_t) == 32, "ioreq_t is 32 bytes");
_Static_assert(offsetof(ioreq_t, vp_eport) == 24, "vp_eport at byte 24");

#define say(...) do { printf(__VA_ARGS__); putchar('\n'); fflush(stdout); } while (0)

struct ctx {
    int nr, answered;
    domid_t domid;
    ioservid_t id;
    xenevtchn_handle *xce;
    xenforeignmemory_resource_handle *fres;
    buffered_iopage_t *buf;
    shared_iopage_t *shared;
    evtchn_port_t eport[128];
    evtchn_port_t bufport;
    int local[128];
    int buflocal;
};

static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof(line), stdin)) {
        say("stdin closed");
        exit(5);
    }
}

static uint64_t answer(const ioreq_t *r)
{
    uint64_t v = 0xc0de0000ull | (r->addr & 0xffff);
    return r->size >= 8 ? v : v & ((1ull << (8 * r->size)) - 1);
}

static void setup(struct ctx *c)
{
    xendevicemodel_handle *dmod = NULL; /* no Xen here: the preload ignores it for its server */
    xenforeignmemory_handle *fmem = NULL;
    void *addr = NULL;
    int rc, i;

    c->xce = xenevtchn_open(NULL, 0);
    say("evtchn_open %s", c->xce ? "ok" : "failed");
    if (!c->xce)
        exit(2);

    rc = xendevicemodel_create_ioreq_server(dmod, c->domid, HVM_IOREQSRV_BUFIOREQ_ATOMIC, &c->id);
    say("create rc=%d id=%u", rc, c->id);
    if (rc)
        exit(2);

    c->fres = xenforeignmemory_map_resource(fmem, c->domid, XENMEM_resource_ioreq_server,
                                            c->id, 0, 2, &addr, PROT_READ | PROT_WRITE, 0);
    say("map_resource %s", c->fres && addr ? "ok" : "failed");
    if (!c->fres)
        exit(2);
    c->buf = addr;
    c->shared = (shared_iopage_t *)((char *)addr + 4096);
    /* Frames past the two pages are refused. */
    errno = 0;
    void *a2 = NULL;
    xenforeignmemory_resource_handle *bad = xenforeignmemory_map_resource(
        fmem, c->domid, XENMEM_resource_ioreq_server, c->id, 1, 2, &a2, PROT_READ, 0);
    say("map_resource frames 1..3 %s errno=%d", bad ? "ok" : "refused", errno);

    rc = xendevicemodel_get_ioreq_server_info(dmod, c->domid, c->id, NULL, NULL, &c->bufport);
    say("get_info rc=%d bufport=%u", rc, c->bufport);
    xen_pfn_t gfn;
    errno = 0;
    rc = xendevicemodel_get_ioreq_server_info(dmod, c->domid, c->id, &gfn, NULL, NULL);
    say("get_info with gfns rc=%d errno=%d", rc, errno);

    rc = xendevicemodel_set_ioreq_server_state(dmod, c->domid, c->id, 1);
    say("set_state rc=%d", rc);

    errno = 0;
    rc = xenevtchn_bind_interdomain(c->xce, c->domid + 1, c->shared->vcpu_ioreq[0].vp_eport);
    say("bind for another domain rc=%d errno=%d", rc, errno);

    for (i = 0; i < c->nr; i++) {
        c->eport[i] = c->shared->vcpu_ioreq[i].vp_eport;
        c->local[i] = xenevtchn_bind_interdomain(c->xce, c->domid, c->eport[i]);
        say("bound vcpu=%d remote=%u local=%d", i, c->eport[i], c->local[i]);
        if (c->local[i] < 0)
            exit(2);
    }
    say("vcpus-bound");
    wait_line();
    c->buflocal = xenevtchn_bind_interdomain(c->xce, c->domid, c->bufport);
    say("bound buffered remote=%u local=%d", c->bufport, c->buflocal);
    if (c->buflocal < 0)
        exit(2);

    rc = xendevicemodel_map_io_range_to_ioreq_server(dmod, c->domid, c->id, 0, 0x90, 0x9f);
    say("map ports rc=%d", rc);
    rc = xendevicemodel_map_io_range_to_ioreq_server(dmod, c->domid, c->id, 1, 0xfe000000, 0xfe000fff);
    say("map mmio rc=%d", rc);
    rc = xendevicemodel_map_io_range_to_ioreq_server(dmod, c->domid, c->id, 1, 0xa0000, 0xbffff);
    say("map vga rc=%d", rc);
    rc = xendevicemodel_map_pcidev_to_ioreq_server(dmod, c->domid, c->id, 0, 0, 5, 0);
    say("map pcidev rc=%d", rc);
    errno = 0;
    rc = xendevicemodel_map_pcidev_to_ioreq_server(dmod, c->domid, c->id, 0, 0, 6, 0);
    say("map pcidev outside grant rc=%d errno=%d", rc, errno);
    rc = xendevicemodel_map_io_range_to_ioreq_server(dmod, c->domid, c->id, 0, 0x98, 0x9b);
    say("map ports 98 rc=%d", rc);
    rc = xendevicemodel_unmap_io_range_from_ioreq_server(dmod, c->domid, c->id, 0, 0x98, 0x9b);
    say("unmap ports 98 rc=%d", rc);
    errno = 0;
    rc = xendevicemodel_unmap_io_range_from_ioreq_server(dmod, c->domid, c->id, 0, 0x98, 0x9b);
    say("unmap ports 98 again rc=%d errno=%d", rc, errno);
}

static int vcpu_of(struct ctx *c, int port)
{
    for (int i = 0; i < c->nr; i++)
        if (c->local[i] == port)
            return i;
    return -1;
}

/* QEMU's handle_buffered_iopage, in short: every entry up to write_pointer. */
static void drain_buffered(struct ctx *c)
{
    buffered_iopage_t *b = c->buf;
    for (;;) {
        uint32_t rd = __atomic_load_n(&b->read_pointer, __ATOMIC_ACQUIRE);
        uint32_t wr = __atomic_load_n(&b->write_pointer, __ATOMIC_ACQUIRE);
        if (rd == wr)
            break;
        buf_ioreq_t e = b->buf_ioreq[rd % IOREQ_BUFFER_SLOT_NUM];
        int qw = e.size == 3;
        uint64_t data = e.data;
        if (qw) {
            if (wr - rd < 2)
                break;
            data |= (uint64_t)b->buf_ioreq[(rd + 1) % IOREQ_BUFFER_SLOT_NUM].data << 32;
        }
        say("buffered type=%u addr=%#x size=%u data=%#llx", e.type, e.addr, 1u << e.size,
            (unsigned long long)data);
        __atomic_fetch_add(&b->read_pointer, qw + 1, __ATOMIC_SEQ_CST);
    }
}

static int readable(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* The first wake-up of "queue" mode: two ports queued, taken one per call. */
static void check_queue(struct ctx *c, int fd)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        ioreq_t *r = &c->shared->vcpu_ioreq[0];
        if (__atomic_load_n((volatile uint8_t *)r + 30, __ATOMIC_ACQUIRE) & 0xf)
            break;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 10) {
            say("no request posted");
            exit(3);
        }
        usleep(1000);
    }
    usleep(50000); /* the multiplexer rings right after it posts */
    int r0 = readable(fd);
    int p1 = xenevtchn_pending(c->xce);
    int r1 = readable(fd);
    int p2 = xenevtchn_pending(c->xce);
    int r2 = readable(fd);
    errno = 0;
    int p3 = xenevtchn_pending(c->xce);
    int e3 = errno;
    say("queue r0=%d p1=%d r1=%d p2=%d r2=%d p3=%d errno=%d buflocal=%d local0=%d", r0, p1,
        r1, p2, r2, p3, e3, c->buflocal, c->local[0]);
    xenevtchn_unmask(c->xce, c->local[0]);
}

/* The second handle of "handles" mode: nothing on it may touch the first one's ports. */
static xenevtchn_handle *second_handle(struct ctx *c)
{
    xenevtchn_handle *b = xenevtchn_open(NULL, 0);
    int fa = xenevtchn_fd(c->xce), fb = xenevtchn_fd(b);
    say("B open %s fdA=%d fdB=%d", b ? "ok" : "failed", fa, fb);
    errno = 0;
    int rc = xenevtchn_bind_interdomain(b, c->domid, c->eport[0]);
    say("B bind vcpu0 again rc=%d errno=%d", rc, errno);
    errno = 0;
    rc = xenevtchn_bind_interdomain(b, c->domid, 12345);
    say("B bind real rc=%d errno=%d", rc, errno);
    errno = 0;
    rc = xenevtchn_notify(b, c->local[0]);
    say("B notify rc=%d errno=%d", rc, errno);
    errno = 0;
    rc = xenevtchn_unmask(b, c->local[0]);
    say("B unmask rc=%d errno=%d", rc, errno);
    errno = 0;
    rc = xenevtchn_unbind(b, c->local[0]);
    say("B unbind rc=%d errno=%d", rc, errno);
    errno = 0;
    rc = xenevtchn_pending(b);
    say("B pending rc=%d errno=%d", rc, errno);
    return b;
}

static void serve(struct ctx *c, int n, int mode_queue, xenevtchn_handle *other)
{
    int fd = xenevtchn_fd(c->xce);
    int served = 0, first = 1;
    say("ready");
    while (served < n) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, 20000);
        if (r == 0) {
            say("timeout");
            exit(3);
        }
        int ports[2], np = 0;
        if (first && mode_queue) {
            check_queue(c, fd);
            drain_buffered(c);
            ports[np++] = c->local[0];
        } else {
            if (first && other) {
                say("readable B=%d A=%d", readable(xenevtchn_fd(other)), readable(fd));
            }
            int port = xenevtchn_pending(c->xce);
            if (port == -1) {
                say("spurious errno=%d", errno);
                continue;
            }
            if (port == c->buflocal) {
                drain_buffered(c);
                xenevtchn_unmask(c->xce, port);
                continue;
            }
            xenevtchn_unmask(c->xce, port);
            ports[np++] = port;
        }
        first = 0;
        for (int k = 0; k < np; k++) {
            int i = vcpu_of(c, ports[k]);
            if (i < 0) {
                say("unknown port %d", ports[k]);
                exit(4);
            }
            ioreq_t *req = &c->shared->vcpu_ioreq[i];
            if (req->state != STATE_IOREQ_READY) {
                say("vcpu %d not ready (state %u)", i, req->state);
                continue;
            }
            __sync_synchronize();
            req->state = STATE_IOREQ_INPROCESS;
            ioreq_t copy = *req;
            __sync_synchronize();
            drain_buffered(c);
            served++;
            if (served > c->answered) {
                say("stalled vcpu=%d", i);
                continue;
            }
            if (copy.dir == IOREQ_READ)
                req->data = answer(&copy);
            say("served vcpu=%d type=%u dir=%u addr=%#llx size=%u data=%#llx", i, copy.type,
                copy.dir, (unsigned long long)copy.addr, copy.size,
                (unsigned long long)req->data);
            __sync_synchronize();
            req->state = STATE_IORESP_READY;
            xenevtchn_notify(c->xce, ports[k]);
        }
    }
    /* Ports still pending (a ring whose writes were drained by a request) are taken like
     * QEMU takes them; then the descriptor must be quiet. */
    int extra = 0;
    while (readable(fd) && extra < 10) {
        int port = xenevtchn_pending(c->xce);
        if (port == -1)
            break;
        extra++;
        if (port == c->buflocal) {
            drain_buffered(c);
            xenevtchn_unmask(c->xce, port);
        }
    }
    say("drained extra=%d readable=%d", extra, readable(fd));
}

static void segv(int sig, siginfo_t *si, void *uc_)
{
    ucontext_t *uc = uc_;
    void *pc = NULL;
    Dl_info info = { 0 };
    char line[512];
    (void)sig;
    (void)si;
#if defined(__x86_64__)
    pc = (void *)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    pc = (void *)uc->uc_mcontext.pc;
#endif
    dladdr(pc, &info);
    int n = snprintf(line, sizeof(line), "crashed in %s\n", info.dli_fname ? info.dli_fname : "?");
    if (write(1, line, n) < 0)
        _exit(7);
    _exit(0);
}

static void inert(struct ctx *c)
{
    errno = 0;
    xenevtchn_handle *h = xenevtchn_open(NULL, 0);
    say("evtchn_open %s errno=%d", h ? "ok" : "failed", errno);
    struct sigaction sa = { 0 };
    sa.sa_sigaction = segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    /* No Xen, so no devicemodel handle: the real function dereferences NULL, and the crash
     * says where the call went. */
    errno = 0;
    int rc = xendevicemodel_create_ioreq_server(NULL, c->domid, HVM_IOREQSRV_BUFIOREQ_ATOMIC, &c->id);
    say("create returned rc=%d errno=%d", rc, errno);
}

int main(int argc, char **argv)
{
    struct ctx c;
    memset(&c, 0, sizeof(c));
    if (argc != 6) {
        fprintf(stderr, "usage: %s MODE NR_VCPUS DOMID REQUESTS ANSWERED\n", argv[0]);
        return 64;
    }
    const char *mode = argv[1];
    c.nr = atoi(argv[2]);
    c.domid = (domid_t)atoi(argv[3]);
    int n = atoi(argv[4]);
    c.answered = atoi(argv[5]);
    if (!strcmp(mode, "inert")) {
        inert(&c);
        return 0;
    }
    setup(&c);
    xenevtchn_handle *other = NULL;
    if (!strcmp(mode, "handles"))
        other = second_handle(&c);
    serve(&c, n, !strcmp(mode, "queue"), other);

    /* QEMU's exit notifier: disable (7.2 does not, but a clean device model would), destroy,
     * unmap, close. */
    int rc = xendevicemodel_set_ioreq_server_state(NULL, c.domid, c.id, 0);
    say("disable rc=%d", rc);
    rc = xendevicemodel_destroy_ioreq_server(NULL, c.domid, c.id);
    say("destroy rc=%d", rc);
    rc = xenforeignmemory_unmap_resource(NULL, c.fres);
    say("unmap_resource rc=%d", rc);
    if (other) {
        rc = xenevtchn_close(other);
        say("B close rc=%d", rc);
    }
    rc = xenevtchn_close(c.xce);
    say("close rc=%d", rc);
    return 0;
}
