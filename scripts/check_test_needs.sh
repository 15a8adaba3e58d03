#!/bin/sh
# What the tests need beyond pip, said before anything is installed (make setup / make test).
#   - a C++ compiler: llama-cpp-python (the GGUF tests' oracle) builds llama.cpp from source;
#     cmake comes from PyPI through pip's build isolation when the system has none.
#   - Debian's chromium and chromium-driver: tests/test_web.py drives the chat page in a headless browser.
# A missing compiler stops here (pip would fail after minutes); a missing browser only skips the browser
# tests, and says so. .ci/run installs all three with apt-get.
# usage: sh scripts/check_test_needs.sh [VENV_PYTHON]
venv_python=${1:-.venv/bin/python}

echo "The test extras (make setup, make test) need, beyond pip: a C++ compiler (llama-cpp-python"
echo "  builds llama.cpp from source) and Debian's chromium + chromium-driver (the chat page's browser test)."

if command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1; then
    echo "  C++ compiler: found"
elif "$venv_python" -c "import llama_cpp" >/dev/null 2>&1; then
    echo "  C++ compiler: not found, but llama-cpp-python is already installed"
else
    echo "error: no C++ compiler (c++, g++ or clang++): llama-cpp-python cannot be built." >&2
    echo "  Debian/Ubuntu: sudo apt-get install g++    macOS: xcode-select --install" >&2
    exit 1
fi

missing=""
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
if [ -n "$missing" ]; then
    echo "  WARNING: missing:$missing -- the chat page's browser tests (tests/test_web.py) will be SKIPPED."
    echo "  To run them (Debian/Ubuntu): sudo apt-get install chromium chromium-driver"
else
    echo "  chromium and chromedriver: found"
fi
