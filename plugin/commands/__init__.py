"""One module per `plugin` subcommand; each exposes `register(subparsers)`."""
