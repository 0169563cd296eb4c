"""The command line: ``LightningCLI`` for both wings, the shortcuts, the checks made before any heavy work.

Also the signals a run stops on, the messages it prints and the console (progress bars, quieted library logs).
"""
