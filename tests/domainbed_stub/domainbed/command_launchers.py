"""Stand-in for domainbed.command_launchers: REGISTRY with upstream's 'local' and 'dummy' launchers."""
import subprocess


def local_launcher(commands):
    """Run the commands one after another on this machine, through the shell."""
    for cmd in commands:
        subprocess.call(cmd, shell=True)


def dummy_launcher(commands):
    """Print the commands instead of running them."""
    for cmd in commands:
        print(f"Dummy launcher: {cmd}")


REGISTRY = {"local": local_launcher, "dummy": dummy_launcher}
