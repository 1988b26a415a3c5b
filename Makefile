# Two commands a new user needs: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp


.PHONY: demo test install clean

$(STAMP): pyproject.toml setup.py moespec/model/_auction_c.c moespec/model/_auction_paths.h
	$(PY) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU build on this machine's disk (never a CUDA wheel).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,profile,io,search]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moespec validate specs/*.yaml
	@for f in specs/*.yaml; do $(BIN)/moespec show $$f || exit 1; done
	$(BIN)/moespec compile specs/mixtral-8x7b.yaml
	$(BIN)/moespec compile specs/qwen1.5-moe-a2.7b.yaml
	$(BIN)/moespec compile specs/tiny-mixed.yaml --check
	$(BIN)/moespec train specs/tiny-mixed.yaml --steps 50
	$(BIN)/moespec train specs/tiny-ep.yaml --steps 50 --nproc 2
	$(BIN)/moespec simulate specs/mixtral-8x7b.yaml --backend h100-cluster-4n --world 32
	$(BIN)/moespec profile specs/tiny-ep.yaml --nproc 2 --out moespec-profile/tiny-ep
	$(BIN)/moespec explore specs/sweeps/cpu-tiny.yaml --out moespec-explore/cpu-tiny
	@echo "exploration plot: moespec-explore/cpu-tiny/pareto.png; profile plots and traces: moespec-profile/tiny-ep/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info moespec-profile moespec-explore
