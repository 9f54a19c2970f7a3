package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The library's cluster helper (cluster_test.go in the root package) is
// test code of another package, so it cannot be imported here; this is a
// smaller one in the same spirit. With CACHEASIDE_REDIS_CLUSTER=1, one
// 3-master cluster is started from redis-server and redis-cli on PATH, on
// free loopback ports, for the whole test binary, and its processes are
// killed by pid when the tests end (TestMain). A cluster that cannot start
// fails the tests that need it.

const envCluster = "CACHEASIDE_REDIS_CLUSTER"

var cluster struct {
	once  sync.Once
	addrs []string
	err   error
	procs []nodeProc
	dir   string
}

// clusterAddrs returns the node addresses of the test cluster, starting it
// on first use.
func clusterAddrs(t *testing.T) []string {
	t.Helper()
	cluster.once.Do(func() { cluster.addrs, cluster.err = startCluster() })
	if cluster.err != nil {
		t.Fatalf("%s=1 but the test cluster did not start: %v", envCluster, cluster.err)
	}
	return cluster.addrs
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startCluster() ([]string, error) {
	dir, err := os.MkdirTemp("", "cacheaside-cli-cluster")
	if err != nil {
		return nil, err
	}
	cluster.dir = dir
	var addrs []string
	for i := 0; i < 3; i++ {
		// A free port can be taken between freePort and the bind (by
		// another test's server, or as the local port of a connection):
		// the server then exits, and it is tried again on other ports.
		var err error
		for attempt := 0; attempt < 5; attempt++ {
			var addr string
			if addr, err = startNode(dir); err == nil {
				addrs = append(addrs, addr)
				break
			}
		}
		if err != nil {
			return nil, fmt.Errorf("cluster node %d: %w", i, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := append([]string{"--cluster", "create"}, addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, a := range addrs {
		err := waitReady(a, func(c *redis.Client) bool {
			info, err := c.ClusterInfo(context.Background()).Result()
			return err == nil && strings.Contains(info, "cluster_state:ok") && strings.Contains(info, "cluster_known_nodes:3\r\n")
		})
		if err != nil {
			return nil, err
		}
	}
	return addrs, nil
}

// startNode starts one cluster-mode redis-server on free ports and waits
// until it answers, as itself: the server on the port must report this
// process's pid, not another server's that took the port first.
func startNode(dir string) (string, error) {
	port, err1 := freePort()
	bus, err2 := freePort()
	if err1 != nil || err2 != nil {
		return "", fmt.Errorf("free ports: %v %v", err1, err2)
	}
	logfile := filepath.Join(dir, fmt.Sprintf("redis-%d.log", port))
	cmd := exec.Command("redis-server",
		"--cluster-enabled", "yes",
		"--cluster-config-file", filepath.Join(dir, fmt.Sprintf("nodes-%d.conf", port)),
		"--cluster-port", fmt.Sprint(bus), "--cluster-node-timeout", "2000",
		"--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no",
		"--logfile", logfile)
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("redis-server: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	pid := fmt.Sprintf("process_id:%d\r\n", cmd.Process.Pid)
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		info, err := c.Info(context.Background(), "server").Result()
		if err == nil && strings.Contains(info, pid) {
			cluster.procs = append(cluster.procs, nodeProc{cmd, exited})
			return addr, nil
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logfile)
			return "", fmt.Errorf("redis-server on %s exited at start:\n%s", addr, log)
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			log, _ := os.ReadFile(logfile)
			return "", fmt.Errorf("redis-server on %s did not answer within 20s (last error %v):\n%s", addr, err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nodeProc is a started node and a channel closed once it has exited
// and been reaped.
type nodeProc struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

// waitReady polls the node at addr until ready holds, for up to 20s.
func waitReady(addr string, ready func(*redis.Client) bool) error {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(20 * time.Second)
	for !ready(c) {
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster node %s: no cluster_state:ok with 3 known nodes after 20s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// stopCluster kills the cluster's processes, by pid, and removes their
// files.
func stopCluster() {
	for _, p := range cluster.procs {
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	if cluster.dir != "" {
		_ = os.RemoveAll(cluster.dir)
	}
}
