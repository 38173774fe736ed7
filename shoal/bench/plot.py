"""stub"""
def add_plot_args(p): pass
def run_plot_cli(args): raise ValueError("bench plot: not implemented yet")
