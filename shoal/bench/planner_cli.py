"""stub"""
def add_plan_args(p): pass
def run_plan_cli(args): raise ValueError("bench plan: not implemented yet")
