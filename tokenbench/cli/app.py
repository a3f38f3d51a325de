"""The typer app, assembled in one place: the global options and every command module's commands."""

from __future__ import annotations


import typer

from . import analyze, check, eval, figure, flops, listing, prune, sweep, throughput, train, train_base, visualize

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="tokenbench: FLOPs, throughput and accuracy of token reduction in vision transformers.")


@app.callback(invoke_without_command=True)
def main_callback(ctx: typer.Context,
                  debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    from ..distributed import init_from_env

    init_from_env()  # under torchrun: join its process group (a no-op otherwise)
    if ctx.invoked_subcommand is None:
        # `tokenbench` alone runs the default sweep, like `tokenbench run`.
        run_cmd = ctx.command.get_command(ctx, "run")
        if run_cmd is None:
            typer.echo(ctx.get_help())
            raise typer.Exit(0)
        ctx.invoke(run_cmd.callback, **{p.name: p.default for p in run_cmd.params})


# the order of `tokenbench --help`
for module in (flops, throughput, eval, train_base, listing, check, train, sweep, visualize, figure, analyze, prune):
    module.register(app)
