"""The committed stubs are what generate.proto produces today."""

from pathlib import Path

from ember.proto import codegen

PROTO_DIR = Path(codegen.__file__).resolve().parent


def test_stubs_are_not_stale(tmp_path):
    for fresh in codegen.generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `make proto` and commit the result"
        )


def test_stubs_import_under_the_ember_namespace():
    from ember.proto import generate_pb2, generate_pb2_grpc

    assert generate_pb2.DESCRIPTOR.package == "ember.v1"
    assert hasattr(generate_pb2_grpc, "TextGenerationServiceStub")
