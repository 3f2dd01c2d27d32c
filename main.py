"""lit-ovis entry point: `python main.py {fit,validate,predict} --config configs/<stage>.yaml [overrides]`."""

from lit_ovis.cli.lightning_cli import run

if __name__ == "__main__":
    run()
