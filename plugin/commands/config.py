"""`plugin config check FILE`: validate a configuration before deploying it."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.command_line import Subcommands
from models.ensemble import MemberSpec, check_flips
from models.modelfile import read_card
from plugin.config import DEFAULT_CONFIG, Config, ConfigError, load_config


def register(sub: Subcommands) -> None:
    p = sub.add_parser("config", help="validate a configuration file")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    check = verbs.add_parser(
        "check", help="parse FILE, check model files, TLS files and secrets; exit 1 on problems"
    )
    check.add_argument("file", nargs="?", type=Path, default=DEFAULT_CONFIG)
    check.set_defaults(func=_check)


def problems(config: Config) -> list[str]:
    """What would stop `plugin serve` with this config, beyond its syntax."""
    from plugin.delivery import DestinationError, make_sender

    found = []
    for i, member in enumerate(config.models.members):
        if not member.path.is_file():
            found.append(f"models.members.{i}.path: no model file at {member.path}")
            continue
        try:
            check_flips(MemberSpec(member.path, tuple(member.flips)), read_card(member.path))
        except ValueError as exc:  # a ModelFileError too
            found.append(f"models.members.{i}: {exc}")
    tls = config.listener.tls
    if tls is not None:
        for key in ("certificate", "private_key", "ca_certificates"):
            path = getattr(tls, key)
            if path is not None and not path.is_file():
                found.append(f"listener.tls.{key}: no file at {path}")
    for i, route in enumerate(config.destinations):
        try:
            make_sender(route.destination).close()
        except (DestinationError, OSError, ValueError) as exc:
            found.append(f"destinations.{i} ({route.name}): {exc}")
    return found


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(exc)
        return 1
    found = problems(config)
    for line in found:
        print(line)
    if found:
        print(f"{args.file}: {len(found)} problem(s)")
        return 1
    names = ", ".join(r.name for r in config.destinations) or "none"
    print(
        f"{args.file}: OK - listener {config.listener.ae_title}@{config.listener.host}:"
        f"{config.listener.port}, {len(config.models.members)} model(s), destinations: {names}"
    )
    return 0
