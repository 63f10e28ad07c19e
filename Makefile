# `make demo` and `make test` create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,inc,tflite,tensorflow
comma  := ,
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup demo test fashion-mnist sshd clean
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

fashion-mnist:          # the Debian package the Fashion-MNIST recipes read (needs root or sudo)
	bash tools/install_fashion_mnist.sh

sshd:                   # openssh-server, for the remote-measurement tests' local sshd (needs root or sudo)
	bash tools/install_openssh_server.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
