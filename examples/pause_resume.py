"""Pause keeps memory and processes; connect resumes the same sandbox."""

from e2b import Sandbox

sandbox = Sandbox.create(timeout=300)
boot_id = sandbox.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
sandbox.commands.run("sleep 3600", background=True)
sandbox.pause()
resumed = Sandbox.connect(sandbox.sandbox_id)
same = resumed.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
print("same boot:", same, "| sleep still running:", "sleep 3600" in resumed.commands.run("ps -eo args").stdout)
resumed.kill()
