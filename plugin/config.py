"""The service configuration: `config.yml` read with pyyaml into pydantic models.

Unknown keys and bad values are errors that name the key path (`listener.port: …`), so a typo
never silently falls back to a default. Relative paths are relative to the config file's folder,
so a config and its model files move together. Secrets are never in the file: a key ending in
`_env` names the environment variable that holds the secret (`resolve_secret`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from models.ensemble import EnsembleSpec, MemberSpec
from plugin.config_types import (
    AETitle,
    ConfigPath,
    DatabaseLocation,
    EnvName,
    Seconds,
    environment_secret,
)
from plugin.delivery import Destination
from plugin.outputs.common import OutputKind
from plugin.selection import SelectionPolicy

DEFAULT_CONFIG = Path("config.yml")


class ConfigError(ValueError):
    """A configuration that cannot be used; each line names the key path and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_secret(env_name: str | None, key_path: str) -> str | None:
    """The secret the environment variable named at `key_path` holds (None when none is named)."""
    return environment_secret(env_name, key_path, ConfigError)


# -- listener -------------------------------------------------------------------------------

# Pixel-compressed syntaxes first, so a sender offering JPEG 2000 and uncompressed in one
# context keeps its compressed bytes (reference: integration-anchors §2.3); decoding happens in
# the worker. Deflate comes after the uncompressed ones: it would make the sender compress.
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    str(uid)
    for uid in (
        JPEG2000Lossless,
        JPEG2000,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        HTJ2K,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEGLosslessSV1,
        JPEGLossless,
        RLELossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,  # makes the sender deflate
        ExplicitVRBigEndian,  # retired
    )
)


class AllowedCaller(Section):
    ae_title: AETitle
    address: str | None = None
    """If set, the caller must also connect from this IP address."""


class TlsConfig(Section):
    certificate: ConfigPath
    private_key: ConfigPath
    ca_certificates: ConfigPath | None = None
    """Trusted CA bundle for client certificates."""
    require_client_certificate: bool = True


class ListenerConfig(Section):
    ae_title: AETitle = "MAMMO_AI"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    allowed_callers: list[AllowedCaller] = []
    """Empty: any calling AE is accepted. Otherwise unknown callers are rejected at
    association time (A-ASSOCIATE-RJ, calling AE title not recognised)."""
    max_associations: int = Field(10, ge=1, le=1000)
    max_associations_per_address: int = Field(4, ge=1, le=1000)
    """Connections (half-open ones included) one address may hold at once, so that one host
    cannot take every association slot."""
    max_pdu_size: int = Field(1_048_576, ge=0)
    """Largest PDU we receive, in bytes, advertised to senders; 0 means unlimited. pynetdicom
    holds one whole PDU in memory, so this bounds the memory of each association (1 MiB
    costs large images nothing measurable against unlimited)."""
    transfer_syntaxes: list[str] = list(DEFAULT_TRANSFER_SYNTAXES)
    """Preference order when a sender proposes several in one presentation context."""
    acse_timeout_seconds: Seconds = 30
    dimse_timeout_seconds: Seconds = 30
    network_timeout_seconds: Seconds = 60
    max_image_pixels: int = Field(100_000_000, ge=1)
    """Images whose header claims more pixels (rows × columns × frames) are refused."""
    tls: TlsConfig | None = None

    @field_validator("transfer_syntaxes")
    @classmethod
    def _known_syntaxes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one transfer syntax UID")
        for uid in value:
            if not UID(uid).is_transfer_syntax:
                raise ValueError(f"{uid} is not a transfer syntax UID known to pydicom")
        if len(set(value)) != len(value):
            raise ValueError("a transfer syntax is listed twice")
        return value


# -- storage, exams, models, worker, delivery ------------------------------------------------


class StorageConfig(Section):
    spool: ConfigPath = Path("var/spool")
    """Received instances and result objects; must be one filesystem (atomic renames). With
    several nodes, a shared mount that every node sees (README, "Scaling out")."""
    database: DatabaseLocation = Path("var/plugin.sqlite")
    """A SQLite file (one node) or `postgresql://user@host:port/db` (several nodes)."""
    password_env: EnvName | None = None
    """The environment variable holding the PostgreSQL password (none: trust, peer, .pgpass)."""
    lease_seconds: Seconds = 60
    """How long a claimed job or delivery stays with a process that stops renewing it."""
    min_free_mb: int = Field(1024, ge=0)
    """Disk watermark: below this much free space in the spool, C-STORE answers 0xA700."""

    def password(self) -> str | None:
        return resolve_secret(self.password_env, "storage.password_env")

    @property
    def postgres(self) -> bool:
        return isinstance(self.database, str)


class ExamsConfig(Section):
    settle_seconds: Seconds = 5
    """Quiet time after the fourth screening view before an exam is analysed."""
    quiet_seconds: Seconds = 60
    """Quiet time after which an incomplete exam is analysed with what it has (partial)."""
    max_wait_seconds: Seconds = 900
    """Hard limit from the first image: an exam that keeps trickling in is analysed anyway."""
    late_images: Literal["reanalyse", "ignore"] = "reanalyse"
    """A new image for an exam already analysed: new analysis and result version, or audit
    and ignore."""
    selection: dict[str, Any] = {}
    """Options of the view-selection policy (plugin.selection.SelectionPolicy)."""

    @field_validator("selection")
    @classmethod
    def _known_policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        SelectionPolicy.from_mapping(value)  # raises ValueError naming the option
        return value

    @model_validator(mode="after")
    def _ordered(self) -> ExamsConfig:
        if not self.settle_seconds <= self.quiet_seconds <= self.max_wait_seconds:
            raise ValueError(
                "need settle_seconds <= quiet_seconds <= max_wait_seconds, got "
                f"{self.settle_seconds}, {self.quiet_seconds}, {self.max_wait_seconds}"
            )
        return self


class ModelMember(Section):
    path: ConfigPath
    flips: list[Literal["none", "hflip", "vflip", "hvflip"]] = ["none"]

    @field_validator("flips")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list each flip once, at least one (use [none] for no flips)")
        return value


class ModelsConfig(Section):
    members: list[ModelMember] = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] | Annotated[str, Field(pattern=r"^cuda:\d+$")] = "auto"
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "fp32"
    """fp32 is IEEE fp32 on every device (TF32 off on CUDA); tf32 allows TF32 on CUDA."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile each member; where that fails it runs eagerly (logged once)."""
    max_batch: int = Field(8, ge=1)
    """Images (views × flips) per forward pass; the worker also gathers decoded exams up to
    this many images into one call of the ensemble, so that forwards batch across exams."""
    max_batch_wait_ms: float = Field(20, ge=0)
    """How long the worker waits for more decoded exams to fill a batch before it runs what
    it has, while more are being decoded (a lone exam runs at once); 0 runs at once."""


def ensemble_spec(models: ModelsConfig) -> EnsembleSpec:
    """The ensemble a config's `models` section describes."""
    return EnsembleSpec(
        members=tuple(MemberSpec(Path(m.path), tuple(m.flips)) for m in models.members),
        device=models.device,
        precision=models.precision,
        max_batch=models.max_batch,
        channels_last=models.channels_last,
        compile=models.compile,
    )


SPARE_CPUS = 4
"""From this many CPUs on, the pipeline's decode and output stages get processes of their own."""


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class WorkerConfig(Section):
    max_attempts: int = Field(3, ge=1)
    """Tries per exam job before it is quarantined with the reason."""
    retry_delay_seconds: Seconds = 10
    devices: list[Annotated[str, Field(pattern=r"^(cpu|cuda:\d+)$")]] = []
    """One worker process per device (`[cuda:0, cuda:1]`); empty: one worker on
    `models.device`, in the serving process."""
    decode_processes: int | None = Field(None, ge=0, le=256)
    """Processes that read and decode images (JPEG 2000 costs seconds an exam); 0 decodes
    in a thread of the worker; null: half the machine's CPUs (at most 8), 0 below 4 CPUs."""
    output_processes: int | None = Field(None, ge=0, le=256)
    """Processes that build and write the result objects; 0 builds the per-view objects in
    two threads of the worker and the SRs in one small process (no torch in it) of their own;
    null: a quarter of the machine's CPUs (1 to 8), 0 below 4 CPUs. Below 4 CPUs the
    ensemble's threads use every core, and two output processes only match two threads
    (measured in bench/pipeline.py) for the memory of two more processes."""
    warm_up: bool = True
    """Analyse a small synthetic exam at start, before claiming jobs, so that the first real
    exam is as fast as the next ones (`plugin.warm_up`)."""
    max_exams_in_flight: int | None = Field(None, ge=1, le=1024)
    """Exams claimed and not yet committed, which bounds the worker's memory (a 3328×2560
    four-view exam holds a few hundred MB in flight); further jobs stay queued in the store,
    where another node may take them. null: enough to keep every stage busy, or one when
    every stage runs in the worker's own threads (below 4 CPUs by default)."""

    @property
    def decoders(self) -> int:
        if self.decode_processes is not None:
            return self.decode_processes
        cpus = machine_cpus()
        return 0 if cpus < SPARE_CPUS else min(8, cpus // 2)

    @property
    def builders(self) -> int:
        if self.output_processes is not None:
            return self.output_processes
        cpus = machine_cpus()
        return 0 if cpus < SPARE_CPUS else max(1, min(8, cpus // 4))

    def in_flight(self, max_batch: int) -> int:
        """Exams the worker holds at once: each pool busy with one and one waiting, plus a
        batch for the ensemble (four views an exam). With no pool processes, one: the stages
        then share the worker's cores, and a second exam in flight only slows the first (the
        ensemble's OpenMP threads wait on output threads). On 2 CPUs, 24 exams through
        bench/pipeline.py: 0.69 exams/s with one, 0.67 with two, 0.60 with six; median
        latency 1.4 s against 9.0 s with six."""
        if self.max_exams_in_flight is not None:
            return self.max_exams_in_flight
        if self.decoders == 0 and self.builders == 0:
            return 1
        batch = max(1, -(-max_batch // 4))
        return 2 * (max(1, self.decoders) + max(1, self.builders)) + batch

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each device once (one worker process per device)")
        return value


class NodeConfig(Section):
    name: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """This node in leases, `plugin status`, metrics and the audit trail; unique among the
    processes that share a database (two `plugin serve` on one host need two names)."""


class DeliveryConfig(Section):
    max_attempts: int = Field(10, ge=1)
    """Tries per (object, destination) before it becomes a dead letter (`plugin retry`)."""
    initial_delay_seconds: Seconds = 5
    max_delay_seconds: Seconds = 3600
    multiplier: float = Field(2.0, ge=1.0)
    batch_size: int = Field(1, ge=1, le=256)
    """Objects per association/request. Each batch is settled after it returns, so a crash
    mid-batch re-sends up to this many objects (same UIDs) after the restart."""
    poll_seconds: Seconds = 0.5


class ObservabilityConfig(Section):
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(9108, ge=0, le=65535)
    """Serves /metrics (Prometheus) and /health; null disables it."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    audit_log: ConfigPath = Path("var/audit.jsonl")
    """One JSON object a line: received, skipped (with reason), analysed, delivered."""


DEFAULT_OUTPUTS = (OutputKind.CAD_SR, OutputKind.TID1500, OutputKind.SEG, OutputKind.SC)


class Route(Section):
    """A destination and the result objects it receives. In the file the `outputs` key sits
    beside the destination's own keys (`type`, `name`, …)."""

    destination: Destination
    outputs: list[OutputKind] = list(DEFAULT_OUTPUTS)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, dict) and "destination" not in data:
            data = dict(data)
            outputs = data.pop("outputs", None)
            return {"destination": data} | ({} if outputs is None else {"outputs": outputs})
        return data

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: list[OutputKind]) -> list[OutputKind]:
        if not value or len(set(value)) != len(value):
            raise ValueError(
                f"list each output once, at least one of: {', '.join(k.value for k in OutputKind)}"
            )
        return value

    @property
    def name(self) -> str:
        return self.destination.name


class Config(Section):
    listener: ListenerConfig = ListenerConfig()
    storage: StorageConfig = StorageConfig()
    exams: ExamsConfig = ExamsConfig()
    models: ModelsConfig
    worker: WorkerConfig = WorkerConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    destinations: list[Route] = []
    observability: ObservabilityConfig = ObservabilityConfig()
    node: NodeConfig = NodeConfig()
    source: Path | None = Field(None, exclude=True)
    """The file this config was read from (set by `load_config`)."""

    @model_validator(mode="after")
    def _unique_destinations(self) -> Config:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destinations: names must be unique, repeated: {', '.join(dupes)}")
        return self

    def route(self, name: str) -> Route:
        for route in self.destinations:
            if route.name == name:
                return route
        raise KeyError(name)

    @property
    def output_kinds(self) -> list[OutputKind]:
        """Every kind some destination takes, in OutputKind order (what the worker builds)."""
        wanted = {k for route in self.destinations for k in route.outputs}
        return [k for k in OutputKind if k in wanted]


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(_key_path(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against the configuration reference)"
        lines.append(f"  {loc or '(top level)'}: {message}")
    return f"{source}: invalid configuration\n" + "\n".join(lines)


def _key_path(loc: tuple[int | str, ...]) -> list[str]:
    """The path as written in the file: without pydantic's wrapper and union-tag segments."""
    out: list[str] = []
    for i, part in enumerate(loc):
        text = str(part)
        in_route = loc[0] == "destinations" and i >= 2
        if text.startswith("function-") or (in_route and i == 2 and text == "destination"):
            continue
        if in_route and i == 3 and loc[2] == "destination" and text in _DESTINATION_TYPES:
            continue
        out.append(text)
    return out


_DESTINATION_TYPES = {"dicom", "dicomweb", "orthanc", "folder"}


def parse_config(data: Any, base: Path, source: str = "config") -> Config:
    """Validate already-parsed YAML; relative paths resolve against `base`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Config.model_validate(data, context={"base": base})
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_config(path: Path | str = DEFAULT_CONFIG) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file; pass --config FILE or run from the repository root"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    config = parse_config(data, path.resolve().parent, str(path))
    return config.model_copy(update={"source": path.resolve()})
