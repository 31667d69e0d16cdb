"""Reading the rich status the sidecar sends (`grpc-status-details-bin`: a google.rpc.Status
with ErrorInfo / RetryInfo details) without googleapis-common-protos.

The three message types are declared in a private descriptor pool, so they never clash with
the real google.rpc registrations when the server's packages share the process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message, message_factory

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"

_F = descriptor_pb2.FieldDescriptorProto


def _pool() -> tuple[type[message.Message], type[message.Message], type[message.Message]]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    fd = descriptor_pb2.FileDescriptorProto(
        name="outrider_client/rpc_status.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/duration.proto"],
    )

    def add(msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, **kw: Any) -> None:
        msg.field.add(name=name, number=number, type=kind, label=kw.pop("label", _F.LABEL_OPTIONAL), **kw)

    status = fd.message_type.add(name="Status")
    add(status, "code", 1, _F.TYPE_INT32)
    add(status, "message", 2, _F.TYPE_STRING)
    add(status, "details", 3, _F.TYPE_MESSAGE, type_name=".google.rpc.Any", label=_F.LABEL_REPEATED)
    any_ = fd.message_type.add(name="Any")  # google.protobuf.Any's wire shape, not its registration
    add(any_, "type_url", 1, _F.TYPE_STRING)
    add(any_, "value", 2, _F.TYPE_BYTES)
    info = fd.message_type.add(name="ErrorInfo")
    add(info, "reason", 1, _F.TYPE_STRING)
    add(info, "domain", 2, _F.TYPE_STRING)
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, _F.TYPE_STRING)
    add(entry, "value", 2, _F.TYPE_STRING)
    add(
        info,
        "metadata",
        3,
        _F.TYPE_MESSAGE,
        type_name=".google.rpc.ErrorInfo.MetadataEntry",
        label=_F.LABEL_REPEATED,
    )
    retry = fd.message_type.add(name="RetryInfo")
    add(retry, "retry_delay", 1, _F.TYPE_MESSAGE, type_name=".google.protobuf.Duration")
    pool.AddSerializedFile(fd.SerializeToString())

    def cls(name: str) -> type[message.Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"google.rpc.{name}"))

    return cls("Status"), cls("ErrorInfo"), cls("RetryInfo")


_Status, _ErrorInfo, _RetryInfo = _pool()


@dataclass(frozen=True, slots=True)
class RichStatus:
    """What the sidecar said beyond code and message (all empty when it sent no details)."""

    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_delay_s: float | None = None


def parse_details(trailing: Any) -> RichStatus:
    """The ErrorInfo and RetryInfo in a call's trailing metadata (undecodable details ignored)."""
    raw = next((v for k, v in trailing or () if k == STATUS_DETAILS_KEY and isinstance(v, bytes)), None)
    if raw is None:
        return RichStatus()
    try:
        status: Any = _Status.FromString(raw)
        reason = domain = ""
        metadata: dict[str, str] = {}
        delay: float | None = None
        for detail in status.details:
            if detail.type_url == _ERROR_INFO:
                info: Any = _ErrorInfo.FromString(detail.value)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.type_url == _RETRY_INFO:
                retry: Any = _RetryInfo.FromString(detail.value)
                delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    except message.DecodeError:
        return RichStatus()
    return RichStatus(reason, domain, metadata, delay)
