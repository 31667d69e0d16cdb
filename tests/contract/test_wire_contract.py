"""The `outrider.v1` contract only grows: compared with the last release's descriptors
(`baseline.binpb`, a FileDescriptorSet), no message, field, enum value, service or method was
renamed, renumbered, retyped or removed. New ones are fine.

At a release, refresh the baseline: `.venv/bin/python -m tests.contract.test_wire_contract`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2

from outrider.v1 import (
    admin_pb2,
    commands_pb2,
    common_pb2,
    control_pb2,
    deployment_pb2,
    events_pb2,
    registry_pb2,
    sidecar_pb2,
)

BASELINE = Path(__file__).with_name("baseline.binpb")
MODULES = (
    common_pb2,
    control_pb2,
    deployment_pb2,
    events_pb2,
    admin_pb2,
    sidecar_pb2,
    commands_pb2,
    registry_pb2,
)


def current() -> descriptor_pb2.FileDescriptorSet:
    files = descriptor_pb2.FileDescriptorSet()
    for module in MODULES:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.file.append(proto)
    return files


def _messages(
    prefix: str, messages: list[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(name, list(message.nested_type))


def _index(files: descriptor_pb2.FileDescriptorSet) -> dict[str, object]:
    """Every named element: messages' fields, enums' values, services' methods."""
    out: dict[str, object] = {}
    for file in files.file:
        package = file.package
        enums = [(f"{package}.{e.name}", e) for e in file.enum_type]
        for name, message in _messages(package, list(file.message_type)):
            for field in message.field:
                oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else ""
                out[f"field {name}.{field.number}"] = (
                    field.name,
                    field.type,
                    field.type_name,
                    field.label,
                    oneof,
                )
            enums += [(f"{name}.{e.name}", e) for e in message.enum_type]
        for name, enum in enums:
            for value in enum.value:
                out[f"enum {name}.{value.name}"] = value.number
        for service in file.service:
            for method in service.method:
                key = f"method {package}.{service.name}/{method.name}"
                out[key] = (
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
    return out


def breaking_changes(
    old: descriptor_pb2.FileDescriptorSet, new: descriptor_pb2.FileDescriptorSet
) -> list[str]:
    before, after = _index(old), _index(new)
    problems = []
    for key, was in sorted(before.items()):
        if key not in after:
            problems.append(f"{key}: removed (or renamed/renumbered) — it was {was}")
        elif after[key] != was:
            problems.append(f"{key}: changed from {was} to {after[key]}")
    return problems


def test_contract_only_adds_to_the_last_release() -> None:
    baseline = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    assert {f.name for f in baseline.file} <= {f.name for f in current().file}
    problems = breaking_changes(baseline, current())
    assert not problems, "breaking changes to outrider.v1:\n" + "\n".join(problems)


def test_contract_check_catches_renames_renumbering_and_removals() -> None:
    baseline = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    for mutate, expected in (
        (lambda f: setattr(f.message_type[0].field[0], "name", "renamed"), "changed"),
        (lambda f: setattr(f.message_type[0].field[0], "number", 999), "removed"),
        (lambda f: f.message_type[0].field.pop(), "removed"),
        (lambda f: setattr(f.enum_type[0].value[1], "number", 42), "changed"),
    ):
        broken = descriptor_pb2.FileDescriptorSet()
        broken.CopyFrom(current())
        target = next(f for f in broken.file if f.message_type and f.enum_type)
        mutate(target)
        problems = breaking_changes(baseline, broken)
        assert problems and all(expected in p for p in problems), problems
    broken = descriptor_pb2.FileDescriptorSet()
    broken.CopyFrom(current())
    service_file = next(f for f in broken.file if f.service)
    methods = service_file.service[0].method
    released = next(i for i, m in enumerate(methods) if m.name in ("StartRollout", "OpenSession"))
    del methods[released]  # a method the last release had (newer ones may be removed freely)
    assert any(p.startswith("method ") for p in breaking_changes(baseline, broken))


if __name__ == "__main__":
    BASELINE.write_bytes(current().SerializeToString())
    print(f"wrote {BASELINE}", file=sys.stderr)
