"""Files: write, read, list, watch."""

from e2b import Sandbox

with Sandbox.create(timeout=120) as sandbox:
    sandbox.files.write("project/main.py", "print('written from the host')\n")
    print([entry.name for entry in sandbox.files.list("project")])
    print(sandbox.commands.run("python3 project/main.py").stdout)
    print(sandbox.files.read("project/main.py"))
