"""``meshgate run``: load, compile, serve; workers, signals and the graceful stop.

    run(options)
      load_config + compile_snapshot   (every error printed, exit 1)
      workers == 1: one uvloop process serving the listeners and the admin API
      workers  > 1: the parent forks N workers (each binds with SO_REUSEPORT),
                    serves the admin API, forwards SIGTERM/SIGINT, and exits when
                    they have all exited

SIGTERM or SIGINT: stop accepting, let requests in flight finish (bounded by
``drain_timeout_s``), exit 0. SIGHUP, or a changed configuration file: reload
(``gateway.reload``, wired in by ``gateway.services``). The current Snapshot is held in
a ``SnapshotRef`` that a reload swaps by reference; a request reads it once and keeps
its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config.errors import Model
from .routing.table import Snapshot
from .server.settings import ServerSettings

__all__ = ["RunOptions", "SnapshotRef", "run"]


@dataclass(frozen=True)
class RunOptions:
    paths: tuple[str, ...]
    address: str = "127.0.0.1"
    admin_port: int = 15000
    # Loopback by default; a Kubernetes pod needs the pod address for kubelet probes.
    admin_address: str = "127.0.0.1"
    labels: Mapping[str, str] = field(default_factory=lambda: {"istio": "ingressgateway"})
    gateway_class: str = "meshgate"
    workers: int = 1
    log_format: str = "json"
    settings: ServerSettings = field(default_factory=ServerSettings)
    drain_timeout_s: float = 5.0
    # The gateway's namespace: decides which RequestAuthentication and
    # AuthorizationPolicy bind (istio-system is Istio's root namespace).
    namespace: str = "istio-system"
    authn: Any = None  # authn.runtime.AuthnSettings; None: the defaults
    credentials_dir: str | None = None  # credentialName -> <dir>/<name>/tls.crt, tls.key, ca.crt
    cert_poll_s: float = 2.0  # how often certificate files are checked for changes (0: never)
    ratelimit: Any = None  # ratelimit.LimiterSettings (--redis-url ...); None: the defaults
    reload_interval_s: float = 1.0  # how often config files are checked (0: SIGHUP only)
    trace_sampling: float = 0.01  # probability of sampling a trace the gateway starts
    otlp_endpoint: str | None = None  # http://host:port/v1/traces; None: no export
    workload_name: str = "meshgate-ingressgateway"  # source_workload in metrics
    stats_dir: str | None = None  # set by the supervisor: where workers answer the parent
    egress: Any = None  # egress.EgressSettings: serve as an egress gateway; None: ingress
    # glibc M_MMAP_THRESHOLD (gateway.memory): 0 leaves glibc's dynamic threshold.
    malloc_mmap_threshold: int = 0


class SnapshotRef:
    """The one mutable cell of the data plane: the Snapshot new requests get."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.current = snapshot


def _services(
    options: RunOptions, ref: SnapshotRef, readiness: Any, pools: Any, serving: bool
) -> Any:
    from .metrics import WorkloadLabels
    from .services import ProcessServices

    snapshot = ref.current
    assert snapshot is not None
    return ProcessServices(
        paths=options.paths,
        build=lambda: build_snapshot(options),
        ref=ref,
        model=_models.get(snapshot.version) or Model(()),
        readiness=readiness,
        reload_interval_s=options.reload_interval_s,
        trace_sampling=options.trace_sampling,
        otlp_endpoint=options.otlp_endpoint,
        workload=WorkloadLabels(options.workload_name, options.namespace),
        pools=pools,
        serving=serving,
        gateway_classes=gateway_classes(options.gateway_class),
        credentials_dir=options.credentials_dir,
    )


def _say(message: str) -> None:
    print(f"meshgate: {message}", file=sys.stderr, flush=True)


# The Model each loaded Snapshot was compiled from (by version), for the admin config
# dump of the first configuration; reloads keep theirs in the Reloader.
_models: dict[str, Model] = {}


def gateway_classes(text: str) -> tuple[str, ...]:
    """``--gateway-class meshgate,edge`` -> the Gateway API classes served."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def with_gateway_api_warnings(
    model: Model, classes: str, credentials_dir: str | None = None
) -> Model:
    """The model with its Gateway API status problems (a route not attached, a backend
    not found) added as warnings, so start-up and reloads report them as validate does."""
    if not any(r.api_group == "gateway.networking.k8s.io" for r in model.resources):
        return model
    from dataclasses import replace

    from .config.gatewayapi_status import bind_gateway_api, status_warnings

    binding = bind_gateway_api(model, gateway_classes(classes), credentials_dir)
    found = status_warnings(binding)
    return replace(model, warnings=(*model.warnings, *found)) if found else model


def build_snapshot(options: RunOptions) -> tuple[Model, Snapshot]:
    """Load, validate and compile; raises ``ConfigErrors`` with every problem."""
    from .config.load import load_config
    from .routing.compile import compile_snapshot

    model = with_gateway_api_warnings(
        load_config(list(options.paths)), options.gateway_class, options.credentials_dir
    )
    snapshot = compile_snapshot(
        model,
        dict(options.labels),
        namespace=options.namespace,
        gateway_classes=gateway_classes(options.gateway_class),
    )
    if options.egress is not None:
        from egress import attach_egress

        snapshot = attach_egress(snapshot, model, options.egress, options.namespace)
    from ratelimit.limiter import LimiterSettings, snapshot_problem

    problem = snapshot_problem(snapshot, options.ratelimit or LimiterSettings())
    if problem is not None:
        # A limit this gateway cannot enforce is a configuration error, at start-up
        # and on reload alike (a reload then keeps the running snapshot).
        from .config import ConfigError, ConfigErrors

        raise ConfigErrors([ConfigError("", "", "", "", problem)], list(model.warnings))
    return model, snapshot


def load_snapshot(options: RunOptions) -> Snapshot | None:
    """Load and compile; prints every problem and returns None when invalid."""
    from .config import ConfigErrors

    try:
        model, snapshot = build_snapshot(options)
    except ConfigErrors as exc:
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(exc.summary(), file=sys.stderr, flush=True)
        return None
    for warning in model.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _models[snapshot.version] = model
    return snapshot


def run(options: RunOptions) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    from .memory import tune_malloc

    # Before any connection's buffers are allocated; forked workers inherit it.
    problem = tune_malloc(options.malloc_mmap_threshold)
    if problem is not None:
        _say(f"memory: {problem}")
    snapshot = load_snapshot(options)
    if snapshot is None:
        return 1
    from .server.listeners import partition_listeners

    served, skipped = partition_listeners(snapshot.listeners.values())
    for listener in skipped:
        _say(
            f"skipping {listener.protocol} listener on port {listener.port}: "
            "not served by this version"
        )
    ports = sorted(listener.port for listener in served)
    from ratelimit.limiter import LimiterSettings
    from ratelimit.local import LocalBuckets

    limits = options.ratelimit or LimiterSettings()
    # Made before the workers fork, so that they all share one table: the local
    # limits are the gateway's, not each worker's.
    buckets = LocalBuckets(limits.local_slots, shared=options.workers > 1)
    if options.workers <= 1:
        import uvloop

        code = uvloop.run(
            _serve_worker(options, snapshot, ports, admin=True, ready_fd=None, buckets=buckets)
        )
        _ignore_stop_signals()
        return code
    return _supervise(options, snapshot, ports, buckets)


def _freeze_heap() -> None:
    """Move every object alive now (modules, the compiled Snapshot) out of the cyclic
    garbage collector's sight. A full collection walks every tracked object; with
    10,000 VirtualServices that is over a million of them, a pause of tens of ms
    that requests queue behind. Frozen objects are still freed by reference
    counting when a reload drops them; only a cycle among them would stay."""
    gc.collect()
    gc.freeze()


def _ignore_stop_signals() -> None:
    """The gateway has drained and its loop is closed, which gives SIGTERM and SIGINT
    back their default action: a second SIGTERM (an impatient supervisor) during the
    interpreter's own teardown would turn a clean exit into a kill."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


async def _serve_worker(
    options: RunOptions,
    snapshot: Snapshot,
    ports: list[int],
    *,
    admin: bool,
    ready_fd: int | None,
    buckets: Any = None,
) -> int:
    from .admin import Readiness, serve_admin
    from .pipeline import Pipeline
    from .server.listeners import ListenerSet
    from .stages import TunnelLog
    from .telemetry import AccessLog
    from .upstream.pool import UpstreamPools

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    settings = options.settings
    if options.egress is not None:
        from dataclasses import replace

        settings = replace(settings, allow_connect=True)
    access_log = AccessLog(options.log_format)
    pools = UpstreamPools(write_buffer_high_bytes=settings.write_buffer_high_bytes)
    # Upstream TLS (DestinationRule tls.credentialName) reads the same directory.
    pools.credentials_dir = getattr(options, "credentials_dir", None)  # type: ignore[attr-defined]
    snapshot_ref = SnapshotRef(snapshot)
    readiness = Readiness(snapshot_version=snapshot.version)
    services = _services(options, snapshot_ref, readiness, pools, serving=True)
    loop.add_signal_handler(signal.SIGHUP, services.sighup)
    from authn.runtime import SecurityRuntime

    security = SecurityRuntime(options.authn)
    # JWKS first fetches before the listeners open (bounded), so the first requests
    # find keys when the endpoint is up; when it is down, they get 401 meanwhile.
    await security.prepare(snapshot.security)
    services.security = security  # JWKS health and decisions in /config_dump, /metrics
    from ratelimit.limiter import start_limiter

    limiter = await start_limiter(options.ratelimit, buckets)
    services.ratelimit = limiter  # counters in /metrics
    egress_kwargs: dict[str, Any] = {}
    egress_runtime = None
    if options.egress is not None:
        from egress.runtime import EgressRuntime

        egress_runtime = EgressRuntime(options.egress, pools, access_log, services.tcp_metrics)
        egress_kwargs = egress_runtime.pipeline_kwargs()
    pipeline = Pipeline(
        snapshot_ref,
        pools,
        access_log,
        security=security,
        limiter=limiter,
        **services.pipeline_kwargs(),
        **egress_kwargs,
    )
    listeners = ListenerSet(pipeline, settings, options.address)
    listeners.tcp_metrics = services.tcp_metrics
    listeners.tunnel_log = TunnelLog(access_log, snapshot_ref)
    if egress_runtime is not None:
        listeners.passthrough = egress_runtime.passthrough(snapshot_ref)
    tls_listeners = [
        snapshot.listeners[port] for port in ports if snapshot.listeners[port].tls_servers
    ]
    # Made even without a TLS listener, so that one a reload adds finds it.
    from .server.tls import CertificateStore

    listeners.certificates = CertificateStore(tls_listeners, options.credentials_dir)
    listeners.snapshot_ref = snapshot_ref
    for problem in listeners.certificates.errors():
        _say(f"TLS: {problem}")
    http3: Any = None

    async def follow_reload(old: Snapshot, new: Snapshot) -> list[str]:
        from .server.listeners import partition_listeners
        from .services import rebind_listeners

        # New JWKS URIs are fetched before the first request needs them.
        await security.prepare(new.security)

        def served(snap: Snapshot) -> set[int]:
            return {lst.port for lst in partition_listeners(snap.listeners.values())[0]}

        _freeze_heap()  # the new snapshot's objects
        problems = await rebind_listeners(listeners, old, new, served)
        store = listeners.certificates
        store.start(options.cert_poll_s)  # a first TLS port may have come with this reload
        problems.extend(await follow_http3(old, new, served(new)))
        return problems

    async def follow_http3(old: Snapshot, new: Snapshot, ports: set[int]) -> list[str]:
        """HTTP/3 for the HTTPS ports of the new Snapshot: started on new ones,
        stopped on removed ones, restarted where the TLS servers changed."""
        nonlocal http3

        def https(snapshot: Snapshot, port: int) -> bool:
            listener = snapshot.listeners.get(port)
            return (
                listener is not None
                and listener.protocol.upper() == "HTTPS"
                and bool(listener.tls_servers)
            )

        wanted = {port for port in ports if https(new, port)}
        if http3 is None and not wanted:
            return []
        if http3 is None:
            from .server.quicports import HTTP3Listeners

            http3 = HTTP3Listeners(pipeline, settings, options.address)
        for port in list(http3.listeners):
            if port not in wanted or (
                not https(old, port)
                or old.listeners[port].tls_servers != new.listeners[port].tls_servers
            ):
                await http3.stop_port(port, options.drain_timeout_s)
        problems: list[str] = []
        for port in sorted(wanted - set(http3.listeners)):
            try:
                notes = await http3.start([new.listeners[port]], listeners.certificates)
            except OSError as exc:
                problems.append(f"HTTP/3 not served on UDP port {port}: {exc}")
                continue
            for note in notes:
                _say(f"HTTP/3: {note}")
        http3.start_watch(options.cert_poll_s)
        return problems

    services.on_applied(follow_reload)
    admin_stop = asyncio.Event()
    admin_task = None
    if admin:
        admin_task = loop.create_task(
            serve_admin(
                readiness,
                options.admin_port,
                admin_stop,
                services.admin_state(),
                address=options.admin_address,
            )
        )
    try:
        tls_ports = {listener.port for listener in tls_listeners}
        await listeners.start([port for port in ports if port not in tls_ports])
        if tls_listeners:
            await listeners.start_tls(tls_listeners)
    except OSError as exc:
        _say(f"cannot bind {options.address}: {exc}")
        admin_stop.set()
        if admin_task is not None:
            await admin_task
        return 1
    if listeners.certificates is not None:
        listeners.certificates.start(options.cert_poll_s)
    # HTTP/3 on the UDP side of each HTTPS port; alt-svc only once that port is bound.
    # aioquic, the adapter and cryptography (about 13 MB of a worker's memory) load
    # with the first QUIC datagram (gateway.server.quicports).
    if any(listener.protocol.upper() == "HTTPS" for listener in tls_listeners):
        from .server.quicports import start_http3

        http3 = await start_http3(
            pipeline,
            settings,
            options.address,
            tls_listeners,
            listeners.certificates,
            options.cert_poll_s,
            _say,
        )
    await services.start(options.stats_dir)
    _freeze_heap()
    readiness.listeners_up = True
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    else:
        where = ", ".join(str(p) for p in ports) or "none"
        admin_text = f"; admin on {options.admin_address}:{options.admin_port}" if admin else ""
        _say(f"serving HTTP on {options.address} ports {where}{admin_text}")
    await stop.wait()
    readiness.draining = True
    await asyncio.gather(
        listeners.stop(options.drain_timeout_s),
        *((http3.stop(options.drain_timeout_s),) if http3 is not None else ()),
    )
    if listeners.certificates is not None:
        await listeners.certificates.close()
    pools.close()
    await security.close()
    await limiter.close()
    await services.close()
    access_log.flush()
    admin_stop.set()
    if admin_task is not None:
        with contextlib.suppress(Exception):
            await admin_task
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervising parent dies, so that a
    killed parent never leaves workers holding the ports."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _supervise(options: RunOptions, snapshot: Snapshot, ports: list[int], buckets: Any) -> int:
    """Fork the workers, serve the admin API, relay signals, reap children."""
    import shutil
    import tempfile
    from dataclasses import replace

    import uvloop

    # Private (0700) directory for the workers' stats sockets (see admin/stats.py).
    stats_dir = tempfile.mkdtemp(prefix="meshgate-stats-")
    options = replace(options, stats_dir=stats_dir)
    ready_read, ready_write = os.pipe()
    children: list[int] = []
    for _ in range(options.workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            _die_with_parent()
            code = 1
            try:
                code = uvloop.run(
                    _serve_worker(
                        options, snapshot, ports, admin=False, ready_fd=ready_write, buckets=buckets
                    )
                )
            finally:
                sys.stdout.flush()
                os._exit(code)
        children.append(pid)
    os.close(ready_write)
    try:
        code = uvloop.run(_parent(options, snapshot, ports, children, ready_read))
        _ignore_stop_signals()
        return code
    finally:
        shutil.rmtree(stats_dir, ignore_errors=True)


async def _parent(
    options: RunOptions, snapshot: Snapshot, ports: list[int], children: list[int], ready_fd: int
) -> int:
    from .admin import Readiness, serve_admin

    loop = asyncio.get_running_loop()
    readiness = Readiness(snapshot_version=snapshot.version)
    # The parent reloads its own copy (for /config_dump and /routes); the workers
    # reload theirs from the same files, and SIGHUP is passed on to them.
    services = _services(options, SnapshotRef(snapshot), readiness, None, serving=False)
    admin_stop = asyncio.Event()
    admin_task = loop.create_task(
        serve_admin(
            readiness,
            options.admin_port,
            admin_stop,
            services.admin_state(options.stats_dir),
            address=options.admin_address,
        )
    )
    alive = set(children)
    codes: list[int] = []
    all_exited = asyncio.Event()
    ready_count = 0

    def on_ready() -> None:
        nonlocal ready_count
        data = os.read(ready_fd, 64)
        ready_count += len(data)
        if not data or ready_count >= len(children):
            loop.remove_reader(ready_fd)
            if ready_count >= len(children):
                readiness.listeners_up = True
                where = ", ".join(str(p) for p in ports) or "none"
                _say(
                    f"serving HTTP on {options.address} ports {where} with "
                    f"{len(children)} workers; "
                    f"admin on {options.admin_address}:{options.admin_port}"
                )

    def forward(signum: int) -> None:
        readiness.draining = True
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def hangup() -> None:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        services.sighup()

    loop.add_reader(ready_fd, on_ready)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, forward, signum)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    await services.start()

    async def watch(pid: int) -> None:
        # uvloop keeps SIGCHLD for itself, so each child is waited for in a thread.
        _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        alive.discard(pid)
        codes.append(os.waitstatus_to_exitcode(status))
        if not readiness.draining:
            # A worker died on its own: stop the others rather than limp on.
            forward(signal.SIGTERM)
        if not alive:
            all_exited.set()

    watchers = [loop.create_task(watch(pid)) for pid in children]
    await all_exited.wait()
    await asyncio.gather(*watchers)
    await services.close()
    admin_stop.set()
    with contextlib.suppress(Exception):
        await admin_task
    with contextlib.suppress(OSError):
        os.close(ready_fd)
    return 0 if all(code == 0 for code in codes) else 1
