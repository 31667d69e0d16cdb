.PHONY: proto check dev bench
proto:  ## regenerate proto/outrider/v1/*_pb2*.py* from the .proto files
	.venv/bin/python scripts/gen_proto.py
check:
	scripts/check
dev:
	scripts/dev
bench:
	scripts/bench
