#!/usr/bin/env bash
# Debian's chromium and chromedriver, which the chat page's browser test drives; installed only
# when missing (apt-get needs root, as on CI and the project's machines).
set -euo pipefail
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver
fi
