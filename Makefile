# `make demo` and `make test` create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,inc,tflite,tensorflow,ray
comma  := ,
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test bench bench-results fashion-mnist sshd clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	case ",$(EXTRAS)," in *,tensorflow,*) bash tools/install_tensorflow_extra.sh $(BIN)/python;; esac
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/rescompress run recipes/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# Every benchmark, then bench/results.json + bench/results.md (about an hour on 2 cores; needs the
# Fashion-MNIST package: make fashion-mnist). Run it on an otherwise idle machine.
bench: $(STAMP)
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

bench-results: $(STAMP) # re-collect bench/*.json into bench/results.{json,md} without measuring again
	$(BIN)/python tools/bench_results.py

fashion-mnist:          # the Debian package the Fashion-MNIST recipes read (needs root or sudo)
	bash tools/install_fashion_mnist.sh

sshd:                   # openssh-server, for the remote-measurement tests' local sshd (needs root or sudo)
	bash tools/install_openssh_server.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
