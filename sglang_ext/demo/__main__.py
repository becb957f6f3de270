"""`python -m sglang_ext.demo`: the online demo (sglang_ext/demo/online.py)."""
import sys

from sglang_ext.demo.online import main

sys.exit(main())
