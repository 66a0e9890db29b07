"""Commands: foreground, background, stdin, environment variables."""

from e2b import Sandbox

with Sandbox.create(timeout=120) as sandbox:
    print(sandbox.commands.run("uname -a && whoami").stdout)
    print(sandbox.commands.run("echo $GREETING", envs={"GREETING": "hi from an env var"}).stdout)
    server = sandbox.commands.run("python3 -m http.server 8080", background=True)
    wait_and_get = ("for i in $(seq 100); do code=$(curl -s -o /dev/null -w '%{http_code}' localhost:8080) && break;"
                    " sleep 0.2; done; echo $code")
    print("listening:", sandbox.commands.run(wait_and_get).stdout)
    sandbox.commands.kill(server.pid)
    echo = sandbox.commands.run("read line; echo you said: $line", background=True, stdin=True)
    sandbox.commands.send_stdin(echo.pid, "hello\n")
    print(echo.wait().stdout)
