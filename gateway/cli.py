"""The ``meshgate`` command line: parses arguments and calls into the packages.

    meshgate run PATH... [--address ADDR] [--admin-port PORT] [--labels k=v,...]
                         [--gateway-class NAME] [--workers N] [--log-format json|text]
    meshgate egress PATH...            # run as the egress gateway (docs/egress.md):
                                       # labels istio=egressgateway, REGISTRY_ONLY
    meshgate validate PATH... [--gateway-class NAME]   # exit 0 clean, 1 errors
    meshgate routes PATH... [--host H] [--json] [--gateway-class NAME]
    meshgate status PATH... [--gateway-class NAME] [--credentials-dir DIR]
                                       # Gateway API status, as YAML
    meshgate demo-backend --port PORT [--name NAME]
    meshgate token --key PEM --issuer ISS [--sub S] [--aud A] [--claim k=v] ...
                                       # development only: mints a test JWT

Exit codes: 0 success, 1 configuration errors, 2 usage errors (argparse's own).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "parse_labels"]


def parse_labels(text: str) -> dict[str, str]:
    """``istio=ingressgateway,app=edge`` -> a dict; raises ValueError on a bad pair."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} is not of the form key=value")
        labels[key.strip()] = value.strip()
    return labels


def _labels_arg(text: str) -> dict[str, str]:
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# The default of --labels; `meshgate egress` tells it from labels given by identity.
_INGRESS_LABELS = {"istio": "ingressgateway"}
_INGRESS_WORKLOAD = "meshgate-ingressgateway"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshgate", description="A gateway-first service mesh configured with Istio YAML."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the Gateways whose selector matches --labels")
    run.add_argument("paths", nargs="+", metavar="PATH", help="YAML file or directory")
    run.add_argument("--address", default="127.0.0.1", help="address to bind (127.0.0.1)")
    run.add_argument("--admin-port", type=int, default=15000, help="admin API port (15000)")
    run.add_argument(
        "--admin-address",
        default="127.0.0.1",
        help="address the admin API binds (127.0.0.1); 0.0.0.0 in a pod, for probes and scrapes",
    )
    run.add_argument(
        "--labels",
        type=_labels_arg,
        default=_INGRESS_LABELS,
        help="this gateway's labels, matched by Gateway selectors (istio=ingressgateway)",
    )
    run.add_argument(
        "--gateway-class",
        default="meshgate",
        help="Gateway API classes served: gatewayClassName values, comma-separated (meshgate)",
    )
    run.add_argument("--workers", type=int, default=1, help="processes sharing the ports (1)")
    run.add_argument("--log-format", choices=("json", "text"), default="json")
    run.add_argument(
        "--credentials-dir",
        metavar="DIR",
        help="where credentialName is looked up: DIR/<name>/tls.crt, tls.key, ca.crt",
    )
    run.add_argument(
        "--cert-poll-s",
        type=float,
        default=2.0,
        help="seconds between checks of certificate files for changes; 0: never (2)",
    )
    security = run.add_argument_group("security (docs/security.md)")
    security.add_argument(
        "--namespace",
        default="istio-system",
        help="the gateway's namespace; decides which security policies bind (istio-system)",
    )
    security.add_argument(
        "--jwt-clock-skew-s", type=float, default=60.0, help="exp/nbf/iat tolerance (60)"
    )
    security.add_argument(
        "--jwks-allow-http",
        action="store_true",
        help="allow plain-HTTP jwksUri to non-loopback hosts (never in production)",
    )
    security.add_argument("--jwks-ca-file", metavar="PEM", help="CA bundle for jwksUri HTTPS")
    security.add_argument(
        "--jwks-refresh-s", type=float, default=1200.0, help="JWKS refresh period (1200)"
    )
    security.add_argument(
        "--jwks-kid-cooldown-s",
        type=float,
        default=30.0,
        help="at most one unknown-kid refetch per URI per this many seconds (30)",
    )
    security.add_argument(
        "--authz-provider",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="URL of the HTTP authorizer a CUSTOM AuthorizationPolicy names (repeatable)",
    )
    ops = run.add_argument_group("reload and telemetry (docs/operations.md)")
    ops.add_argument(
        "--reload-interval-s",
        type=float,
        default=1.0,
        help="seconds between checks of the config files for changes; 0: SIGHUP only (1)",
    )
    ops.add_argument(
        "--trace-sampling",
        type=float,
        default=1.0,
        metavar="PERCENT",
        help="share of traces started here that are sampled, in percent (1)",
    )
    ops.add_argument(
        "--otlp-endpoint", metavar="URL", help="export sampled spans as OTLP/HTTP JSON here"
    )
    ops.add_argument(
        "--workload-name",
        default=_INGRESS_WORKLOAD,
        help="this gateway's workload name in metrics (meshgate-ingressgateway)",
    )
    limits = run.add_argument_group("limits (defaults in docs/operations.md)")
    limits.add_argument("--max-request-header-bytes", type=int, help="head size; over it: 431")
    limits.add_argument("--max-request-headers", type=int, help="header count; over it: 431")
    limits.add_argument("--max-request-body-bytes", type=int, help="body size; over it: 413")
    limits.add_argument(
        "--request-header-timeout-s", type=float, help="time to send a head; over it: 408"
    )
    limits.add_argument("--idle-timeout-s", type=float, help="idle keep-alive connections")
    limits.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        help="a stream stalled on its client this long ends (flag SI); 0: off",
    )
    limits.add_argument("--drain-timeout-s", type=float, default=5.0, help="graceful stop (5)")
    limits.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="glibc: blocks this large get their own mapping, returned when freed "
        "(0, the default: glibc's dynamic threshold; docs/performance.md)",
    )
    ratelimit = run.add_argument_group("rate limits (docs/ratelimit.md)")
    ratelimit.add_argument(
        "--redis-url",
        default=os.environ.get("MESHGATE_REDIS_URL") or None,
        help="Redis for backend: redis limits: redis://host:port/db, redis+cluster://host:port, "
        "redis+sentinel://host:port/service (default: $MESHGATE_REDIS_URL)",
    )
    ratelimit.add_argument(
        "--redis-timeout-ms", type=float, default=100.0, help="one decision's round trip (100)"
    )
    ratelimit.add_argument(
        "--ratelimit-local-slots",
        type=int,
        default=65536,
        help="buckets kept in process, a power of two, 16 bytes each (65536)",
    )

    egress = run.add_argument_group("egress gateway (docs/egress.md)")
    egress.add_argument(
        "--outbound-traffic-policy",
        choices=("REGISTRY_ONLY", "ALLOW_ANY"),
        help="serve as an egress gateway: only ServiceEntry hosts (REGISTRY_ONLY, the "
        "default with `meshgate egress` or labels istio=egressgateway) or any host",
    )
    egress.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="DNS server for egress name resolution (repeatable; default: /etc/resolv.conf)",
    )
    egress.add_argument(
        "--dns-timeout-s",
        type=float,
        default=5.0,
        help="one name's resolution, retries included (5)",
    )
    egress.add_argument(
        "--dns-min-ttl-s",
        type=float,
        default=0.0,
        help="keep every DNS answer at least this long, whatever its TTL (0)",
    )
    egress.add_argument(
        "--hosts-file",
        default="/etc/hosts",
        metavar="PATH",
        help="names answered from this file before DNS, re-read when it changes "
        "(/etc/hosts; '' for none)",
    )
    sub.add_parser(
        "egress",
        parents=[run],
        add_help=False,
        help="serve as the egress gateway: `run` with labels istio=egressgateway, "
        "workload meshgate-egressgateway and REGISTRY_ONLY unless told otherwise",
    )

    classes_help = "Gateway API classes served, comma-separated (meshgate)"
    validate = sub.add_parser("validate", help="check configuration; exit 1 on errors")
    validate.add_argument("paths", nargs="+", metavar="PATH")
    validate.add_argument("--gateway-class", default="meshgate", help=classes_help)

    status = sub.add_parser(
        "status", help="print the Gateway API status (conditions) of the configuration"
    )
    status.add_argument("paths", nargs="+", metavar="PATH")
    status.add_argument("--gateway-class", default="meshgate", help=classes_help)
    status.add_argument(
        "--credentials-dir",
        metavar="DIR",
        help="check that certificateRefs have DIR/<name>/tls.crt and tls.key",
    )

    routes = sub.add_parser("routes", help="print the compiled route table")
    routes.add_argument("paths", nargs="+", metavar="PATH")
    routes.add_argument("--host", help="only this host")
    routes.add_argument("--json", action="store_true", help="machine-readable output")
    routes.add_argument(
        "--labels", type=_labels_arg, default={"istio": "ingressgateway"}, help="gateway labels"
    )
    routes.add_argument("--gateway-class", default="meshgate", help=classes_help)

    token = sub.add_parser(
        "token", help="DEVELOPMENT ONLY: mint a test JWT with a local private key"
    )
    from authn.devtoken import add_arguments as add_token_arguments

    add_token_arguments(token)

    demo = sub.add_parser("demo-backend", help="a small echo service for demos and tests")
    demo.add_argument("--port", type=int, required=True)
    demo.add_argument("--name", default="demo")
    demo.add_argument("--address", default="127.0.0.1")
    return parser


def _print_problems(errors: Sequence[object], warnings: Sequence[object]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import ConfigErrors
    from .config.load import load_config
    from .runtime import with_gateway_api_warnings

    try:
        model = load_config(args.paths)
    except ConfigErrors as exc:
        _print_problems(exc.errors, exc.warnings)
        print(exc.summary(), file=sys.stderr)
        return 1
    # Gateway API conditions that are not as they should be (a route not attached, a
    # backend not found) are warnings: the configuration is valid, a controller
    # would accept it and report them in status.
    warnings = list(with_gateway_api_warnings(model, args.gateway_class).warnings)
    _print_problems((), warnings)
    count = len(model.resources)
    print(f"{count} resource{'s' if count != 1 else ''} valid, {len(warnings)} warnings")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import yaml

    from .config import ConfigErrors
    from .config.gatewayapi_status import bind_gateway_api, status_to_dict
    from .config.load import load_config
    from .runtime import gateway_classes

    try:
        model = load_config(args.paths)
    except ConfigErrors as exc:
        _print_problems(exc.errors, exc.warnings)
        print(exc.summary(), file=sys.stderr)
        return 1
    binding = bind_gateway_api(model, gateway_classes(args.gateway_class), args.credentials_dir)
    print(yaml.safe_dump(status_to_dict(binding), sort_keys=False, width=200), end="")
    return 0


def _cmd_routes(args: argparse.Namespace) -> int:
    from .config import ConfigErrors
    from .config.load import load_config
    from .routing.compile import compile_snapshot
    from .routing.dump import format_routes
    from .runtime import gateway_classes

    try:
        model = load_config(args.paths)
    except ConfigErrors as exc:
        _print_problems(exc.errors, exc.warnings)
        print(exc.summary(), file=sys.stderr)
        return 1
    snapshot = compile_snapshot(
        model, args.labels, gateway_classes=gateway_classes(args.gateway_class)
    )
    print(format_routes(snapshot, host=args.host, as_json=args.json))
    return 0


def _ratelimit_settings(args: argparse.Namespace) -> object:
    from ratelimit.limiter import LimiterSettings
    from ratelimit.redis_backend import RedisURLError, parse_redis_url

    slots = args.ratelimit_local_slots
    problem = None
    if slots < 8 or slots & (slots - 1):
        problem = f"--ratelimit-local-slots must be a power of two >= 8, not {slots}"
    elif args.redis_url:
        try:
            parse_redis_url(args.redis_url)
        except RedisURLError as exc:
            problem = f"--redis-url: {exc}"
    if problem is not None:
        print(f"meshgate: {problem}", file=sys.stderr)
        raise SystemExit(2)  # a usage error, as argparse's own
    return LimiterSettings(args.redis_url, args.redis_timeout_ms / 1000.0, slots)


def _cmd_run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .runtime import RunOptions, run
    from .server.settings import ServerSettings

    limits = {
        name: getattr(args, name)
        for name in (
            "max_request_header_bytes",
            "max_request_headers",
            "max_request_body_bytes",
            "request_header_timeout_s",
            "idle_timeout_s",
            "stream_idle_timeout_s",
        )
        if getattr(args, name) is not None
    }
    labels, workload, egress = _egress_mode(args)
    options = RunOptions(
        paths=tuple(args.paths),
        address=args.address,
        admin_port=args.admin_port,
        admin_address=args.admin_address,
        labels=labels,
        gateway_class=args.gateway_class,
        workers=args.workers,
        log_format=args.log_format,
        settings=replace(ServerSettings(), **limits),
        drain_timeout_s=args.drain_timeout_s,
        reload_interval_s=args.reload_interval_s,
        trace_sampling=max(0.0, min(100.0, args.trace_sampling)) / 100.0,
        otlp_endpoint=_otlp_endpoint(args.otlp_endpoint),
        workload_name=workload,
        credentials_dir=args.credentials_dir,
        cert_poll_s=args.cert_poll_s,
        namespace=args.namespace,
        authn=_authn_settings(args),
        ratelimit=_ratelimit_settings(args),
        egress=egress,
        malloc_mmap_threshold=args.malloc_mmap_threshold,
    )
    return run(options)


def _egress_mode(args: argparse.Namespace) -> tuple[dict[str, str], str, object]:
    """(labels, workload name, egress.EgressSettings or None).

    ``meshgate egress``, labels ``istio=egressgateway`` or an explicit
    ``--outbound-traffic-policy`` make this process an egress gateway."""
    labels, workload = args.labels, args.workload_name
    is_egress = args.command == "egress"
    if is_egress and labels is _INGRESS_LABELS:
        labels = {"istio": "egressgateway"}
    if is_egress and workload == _INGRESS_WORKLOAD:
        workload = "meshgate-egressgateway"
    is_egress = (
        is_egress
        or labels.get("istio") == "egressgateway"
        or args.outbound_traffic_policy is not None
    )
    if not is_egress:
        return dict(labels), workload, None
    from egress import REGISTRY_ONLY, EgressSettings
    from egress.dns import NoDnsServers, Resolver, parse_server

    if args.hosts_file and args.hosts_file != "/etc/hosts" and not os.path.isfile(args.hosts_file):
        # A file named on purpose that is not there is a typo, not "no names".
        print(f"meshgate: --hosts-file {args.hosts_file!r}: no such file", file=sys.stderr)
        raise SystemExit(2)
    for server in args.dns_server:
        try:
            parse_server(server)
        except ValueError as exc:
            print(f"meshgate: --dns-server {server!r}: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    if not args.dns_server:
        try:
            Resolver()  # reads /etc/resolv.conf: fail here, not in every worker
        except NoDnsServers as exc:
            print(f"meshgate: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
    settings = EgressSettings(
        outbound_traffic_policy=args.outbound_traffic_policy or REGISTRY_ONLY,
        dns_servers=tuple(args.dns_server),
        dns_timeout_s=args.dns_timeout_s,
        dns_min_ttl_s=max(0.0, args.dns_min_ttl_s),
        hosts_file=args.hosts_file,
    )
    return dict(labels), workload, settings


def _authn_settings(args: argparse.Namespace) -> object:
    from authn.jwks import JwksSettings
    from authn.runtime import AuthnSettings

    providers: dict[str, str] = {}
    for item in args.authz_provider:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise SystemExit(f"meshgate: --authz-provider {item!r} is not NAME=URL")
        providers[name] = url
    jwks = JwksSettings(
        refresh_s=args.jwks_refresh_s,
        kid_cooldown_s=args.jwks_kid_cooldown_s,
        allow_http=args.jwks_allow_http,
        ca_file=args.jwks_ca_file,
    )
    return AuthnSettings(clock_skew_s=args.jwt_clock_skew_s, jwks=jwks, authz_providers=providers)


def _cmd_token(args: argparse.Namespace) -> int:
    from authn.devtoken import run_token_command

    return run_token_command(args)


def _otlp_endpoint(url: str | None) -> str | None:
    if url is not None and not url.startswith("http://"):
        raise SystemExit(f"meshgate: --otlp-endpoint {url!r}: only http:// URLs are supported")
    return url


def _cmd_demo_backend(args: argparse.Namespace) -> int:
    from .demo_backend import serve

    serve(port=args.port, name=args.name, address=args.address)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "egress": _cmd_run,
        "validate": _cmd_validate,
        "routes": _cmd_routes,
        "status": _cmd_status,
        "demo-backend": _cmd_demo_backend,
        "token": _cmd_token,
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
