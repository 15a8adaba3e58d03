"""One module per mode: `add_arguments(parser)`, a frozen settings dataclass built and fully checked
by `settings(args)`, and `run(settings) -> exit code`. The library modules never see argparse."""

MODES = {
    "test": "sakimi_next.commands.test",
    "prepare_data": "sakimi_next.commands.prepare_data",
    "train": "sakimi_next.commands.train",
    "generate": "sakimi_next.commands.generate",
    "eval": "sakimi_next.commands.eval",
    "export": "sakimi_next.commands.export",
    "bench": "sakimi_next.commands.bench",
    "serve": "sakimi_next.commands.serve",
}
