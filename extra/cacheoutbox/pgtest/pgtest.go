// Package pgtest starts a throwaway PostgreSQL with wal_level=logical for
// tests of change data capture: initdb and pg_ctl of the installed
// PostgreSQL in a temporary directory, on a free loopback port, stopped by
// pid when the test ends.
package pgtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// EnvLogical makes the change-data-capture tests required: they start a
// PostgreSQL of their own with wal_level=logical (initdb and pg_ctl from
// PATH or pg_config --bindir, run as the postgres user when the tests run
// as root, which PostgreSQL refuses).
const EnvLogical = "CACHEASIDE_PG_LOGICAL"

// StartLogical starts a PostgreSQL with wal_level=logical on a free
// loopback port in a temporary directory, stopped by pid at cleanup, and
// returns its connection string.
func StartLogical(t testing.TB) string {
	t.Helper()
	if os.Getenv(EnvLogical) != "1" {
		t.Skipf("change data capture needs a PostgreSQL with wal_level=logical: set %s=1 to start one (initdb, pg_ctl)", EnvLogical)
	}
	bin := func(name string) string {
		if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
			if p := filepath.Join(strings.TrimSpace(string(out)), name); fileExists(p) {
				return p
			}
		}
		p, err := exec.LookPath(name)
		if err != nil {
			t.Fatalf("%s=1 but %s is not installed: %v", EnvLogical, name, err)
		}
		return p
	}
	dir, err := os.MkdirTemp("", "cacheoutbox-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	run := func(args ...string) *exec.Cmd { return exec.Command(args[0], args[1:]...) }
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root and there is no postgres user to run PostgreSQL as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
		run = func(args ...string) *exec.Cmd {
			return exec.Command("runuser", append([]string{"-u", "postgres", "--"}, args...)...)
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := run(bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	opts := fmt.Sprintf("-p %d -c listen_addresses=127.0.0.1 -c unix_socket_directories=%s -c wal_level=logical -c max_wal_senders=8 -c max_replication_slots=8 -c fsync=off -c max_slot_wal_keep_size=1GB", port, dir)
	if out, err := run(bin("pg_ctl"), "-D", data, "-o", opts, "-l", filepath.Join(dir, "log"), "-w", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	t.Cleanup(func() {
		b, err := os.ReadFile(filepath.Join(data, "postmaster.pid"))
		if err != nil {
			return
		}
		pid, _ := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
		if pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGQUIT)
			for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
	})
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }
