# `make demo` and `make test` create .venv when missing and install the project into it: `demo` only what
# recipes/quickstart.yaml needs (the core, and the tflite extra: it exports a .tflite), `test` the extras the
# suite exercises. Each installed extra leaves a marker, .venv/.installed-<checksum of pyproject.toml>-<extra>;
# a target whose extras all have one installs nothing, otherwise pip resolves its extras together with those
# already installed (so `make test` after `make demo` adds the rest, and `make demo` after `make test` is a no-op).
PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
EXTRAS      ?= dev,inc,tflite,tensorflow,ray
DEMO_EXTRAS ?= tflite
comma       := ,
MARK        := .installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup setup-demo demo test bench bench-results fashion-mnist sshd clean
setup:      WANT = $(EXTRAS)
setup-demo: WANT = $(DEMO_EXTRAS)
setup setup-demo:
	@set -e; want="core $(subst $(comma), ,$(WANT))"; missing=; \
	for e in $$want; do test -f $(VENV)/$(MARK)-$$e || missing="$$missing $$e"; done; \
	test -z "$$missing" && exit 0; \
	have=$$(ls -a $(VENV) 2>/dev/null | sed -n 's/^$(MARK)-\([a-z0-9_]*\)$$/\1/p'); \
	extras=$$(printf '%s\n' $$want $$have | grep -vx core | sort -u | paste -sd, -); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	echo "installing rescompress$${extras:+[$$extras]} into $(VENV)"; \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".$${extras:+[$$extras]}"; \
	case ",$$extras," in *,tensorflow,*) bash tools/install_tensorflow_extra.sh $(BIN)/python;; esac; \
	rm -f $(VENV)/.installed-*; for e in core $$(echo $$extras | tr , ' '); do touch $(VENV)/$(MARK)-$$e; done

demo: setup-demo
	$(BIN)/rescompress run recipes/quickstart.yaml

test: setup
	$(BIN)/python -m pytest

# Every benchmark, then bench/results.json + bench/results.md (about an hour on 2 cores; needs the
# Fashion-MNIST package: make fashion-mnist). Run it on an otherwise idle machine.
bench: setup
	$(BIN)/python tools/bench_pipeline.py recipes/quickstart.yaml recipes/fashion_mnist_int8.yaml
	$(BIN)/python tools/bench_defaults.py
	$(BIN)/python tools/bench_int8_onnxruntime.py --model resnet18 --size 224 --runs 30 --out bench/int8_onnxruntime_resnet18.json
	$(BIN)/python tools/bench_int8_onnxruntime.py --model resnet20 --size 32 --runs 150 --out bench/int8_onnxruntime_resnet20.json
	$(BIN)/python tools/bench_int8_litert.py --model resnet18 --size 224 --runs 24 --out bench/int8_litert_resnet18.json
	$(BIN)/python tools/bench_int8_litert.py --model resnet20 --size 32 --runs 150 --out bench/int8_litert_resnet20.json
	$(BIN)/python tools/bench_pruning.py --model resnet18 --size 224
	$(BIN)/python tools/bench_pruning.py --model resnet20 --size 32 --runs 80
	$(BIN)/python tools/bench_roofline.py --model resnet18 --size 224
	$(BIN)/python tools/bench_roofline.py --model resnet20 --size 32 --runs 150
	$(BIN)/python tools/bench_results.py

bench-results: setup # re-collect bench/*.json into bench/results.{json,md} without measuring again
	$(BIN)/python tools/bench_results.py

fashion-mnist:          # the Debian package the Fashion-MNIST recipes read (needs root or sudo)
	bash tools/install_fashion_mnist.sh

sshd:                   # openssh-server, for the remote-measurement tests' local sshd (needs root or sudo)
	bash tools/install_openssh_server.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
