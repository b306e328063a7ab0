"""`avatar-serve`: run the service and administer accounts.

    avatar-serve run [--host 127.0.0.1] [--port 8000] [--db URL] [--data-dir DIR] [--config YAML]
    avatar-serve create-key --tier pro --credits 100      # new account + key (printed once)
    avatar-serve create-key --account acct_…              # another key for an existing account
    avatar-serve grant-credits ACCOUNT N
    avatar-serve set-tier ACCOUNT TIER

`run` starts a private single-machine Ray (no dashboard, no usage stats, auth token off),
Serve on 127.0.0.1 and the app from `serve/config/serve_local.yaml` (tiny-sd15, SQLite, local
files) unless told otherwise. The config goes through Serve's own config path, exactly as with
`serve run <config>`: the builder gets `args` (plus the flags here), Serve applies `deployments:`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading

from .face_settings import check_face_setup
from .settings import ServiceSettings
from .vocab import TIERS


def _settings(args: argparse.Namespace, **extra) -> ServiceSettings:
    over = {k: v for k, v in {"db_url": args.db, "data_dir": args.data_dir, **extra}.items() if v is not None}
    return ServiceSettings.from_env(**over)


def _store(args: argparse.Namespace):
    from .store import open_store

    s = _settings(args)
    if s.resolved_db_url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(s.resolved_db_url[len("sqlite:///"):]) or ".", exist_ok=True)
    return open_store(s.resolved_db_url)


def cmd_create_key(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.account:
            acct = store.get_account(args.account)
            if acct is None:
                print(f"error: no account {args.account!r}", file=sys.stderr)
                return 2
        else:
            acct = store.create_account(args.tier, args.credits)
        _, key = store.create_api_key(acct.id)
    finally:
        store.close()
    if args.quiet:
        print(key)
    else:
        print(f"account: {acct.id}  tier: {acct.tier}  credits: {acct.credits}")
        print(f"api key: {key}")
        print("(the key is shown once; only its hash is stored)")
    return 0


def _update_account(args: argparse.Namespace, change, describe) -> int:
    """Run one operator change on an account; an unknown account is a one-line error."""
    from .store import AccountNotFound

    store = _store(args)
    try:
        acct = change(store)
    except AccountNotFound:
        print(f"error: no account {args.account!r}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"account: {acct.id}  {describe(acct)}")
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    return _update_account(args, lambda s: s.grant_credits(args.account, args.amount, note=args.note),
                           lambda a: f"credits: {a.credits}")


def cmd_set_tier(args: argparse.Namespace) -> int:
    return _update_account(args, lambda s: s.set_tier(args.account, args.tier), lambda a: f"tier: {a.tier}")


def start_ray(num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """A private local Ray: no dashboard, no usage stats, no auth token, small object store."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    temp_dir = temp_dir or os.path.join(tempfile.gettempdir(), f"avs-{os.getuid()}")
    ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
             object_store_memory=128 * 1024 * 1024, _temp_dir=temp_dir, log_to_driver=True,
             configure_logging=False)


def cmd_run(args: argparse.Namespace) -> int:
    from .deployments import default_config_path, load_config, run_config, with_args

    config = load_config(args.config or default_config_path())
    s = _settings(args)
    overrides = {"data_dir": os.path.abspath(s.data_dir), "db_url": s.resolved_db_url,
                 "assets_url": s.resolved_assets_url}
    if args.models:
        overrides["models"] = args.models.split(",")
    if args.device:
        overrides["device"] = args.device
    os.makedirs(overrides["data_dir"], exist_ok=True)
    for app in with_args(config, overrides)["applications"]:  # face settings refused in one line, before Ray starts
        check_face_setup(ServiceSettings.from_dict(app.get("args") or {}))
    start_ray(args.num_cpus)
    import ray
    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port})
    run_config(config, overrides)
    print(f"Avatar API on http://{args.host}:{args.port}/v1  (OpenAPI: /v1/openapi.json)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avatar-serve", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--db", help="database URL (default sqlite:///<data-dir>/avatar.db; env AVATAR_DB_URL)")
        sp.add_argument("--data-dir", help="data directory (default ./.avatar-engine; env AVATAR_DATA_DIR)")

    r = sub.add_parser("run", help="start Ray Serve with the API")
    common(r)
    r.add_argument("--host", default=os.environ.get("AVATAR_HOST", "127.0.0.1"))
    r.add_argument("--port", type=int, default=int(os.environ.get("AVATAR_PORT", "8000")))
    r.add_argument("--config", help="Serve config YAML (default: serve/config/serve_local.yaml)")
    r.add_argument("--models", help="comma-separated profile names to serve (default from the config)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default from the config)")
    r.add_argument("--num-cpus", type=int, help="CPUs given to the local Ray (default: all, at least 2)")
    r.set_defaults(fn=cmd_run)

    k = sub.add_parser("create-key", help="create an account and API key (or a key for --account)")
    common(k)
    k.add_argument("--tier", default="free", choices=TIERS)
    k.add_argument("--credits", type=int, default=0)
    k.add_argument("--account", help="existing account id: only create another key")
    k.add_argument("--quiet", "-q", action="store_true", help="print only the key")
    k.set_defaults(fn=cmd_create_key)

    g = sub.add_parser("grant-credits", help="add credits to an account")
    common(g)
    g.add_argument("account")
    g.add_argument("amount", type=int)
    g.add_argument("--note")
    g.set_defaults(fn=cmd_grant)

    t = sub.add_parser("set-tier", help="change an account's tier")
    common(t)
    t.add_argument("account")
    t.add_argument("tier", choices=TIERS)
    t.set_defaults(fn=cmd_set_tier)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
