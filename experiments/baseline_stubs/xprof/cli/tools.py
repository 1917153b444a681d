"""Stand-in for ``xprof.cli.tools`` (see ``baseline_stubs/xprof/__init__.py``)."""


class _Missing:
    def __getattr__(self, name):
        raise NotImplementedError(f"xprof is not installed: get_kernel_stats_tool.{name} is a stand-in so that "
                                  "tokamax imports (experiments/qmatmul_baselines.py); install xprof to use it")


get_kernel_stats_tool = _Missing()
