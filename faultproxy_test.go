package cacheaside

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// The fault tests put Toxiproxy (github.com/Shopify/toxiproxy) between the
// cache and a redis-server: latency, black holes, refused connections.
// Toxiproxy runs as a process, driven through its HTTP API, so that the
// library's go.mod does not carry it and the Prometheus client and logger
// it depends on. The first fault test builds toxiproxy-server with
// `go install` (about 8 s, once: the binary is kept in the user's cache
// directory); each proxy gets a server process of its own, stopped by pid
// when its test ends.

// toxiproxyVersion is the Toxiproxy release the fault tests build.
const toxiproxyVersion = "v2.5.0"

var toxiproxyBin = sync.OnceValues(func() (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "cacheaside", "toxiproxy-"+toxiproxyVersion)
	bin := filepath.Join(dir, "server")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	cmd := exec.Command("go", "install", "github.com/Shopify/toxiproxy/v2/cmd/server@"+toxiproxyVersion)
	cmd.Dir = os.TempDir() // outside this module
	cmd.Env = append(os.Environ(), "GOBIN="+dir, "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go install toxiproxy %s: %w\n%s", toxiproxyVersion, err, out)
	}
	return bin, nil
})

// toxiProxy is one proxy on a toxiproxy-server process of its own.
type toxiProxy struct {
	tb     testing.TB
	api    string // http://127.0.0.1:port
	Listen string // the proxy's address: give it to the client
}

// newProxy starts a toxiproxy-server on a free loopback port and a proxy
// on it from a free loopback port to upstream.
func newProxy(tb testing.TB, upstream string) *toxiProxy {
	tb.Helper()
	bin, err := toxiproxyBin()
	if err != nil {
		tb.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	cmd := exec.Command(bin, "-host", "127.0.0.1", "-port", fmt.Sprint(port))
	if err := cmd.Start(); err != nil {
		tb.Fatalf("toxiproxy-server: %v", err)
	}
	tb.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	p := &toxiProxy{tb: tb, api: fmt.Sprintf("http://127.0.0.1:%d", port)}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if resp, err := http.Get(p.api + "/version"); err == nil {
			_ = resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("toxiproxy-server on port %d did not answer within 10s", port)
		}
	}
	var created struct{ Listen string }
	p.call("POST", "/proxies", map[string]any{"name": "redis", "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true}, &created)
	p.Listen = created.Listen
	return p
}

// call sends one API request and decodes its reply into out (if not nil).
func (p *toxiProxy) call(method, path string, body any, out any) {
	p.tb.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			p.tb.Fatal(err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, p.api+path, r)
	if err != nil {
		p.tb.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.tb.Fatalf("toxiproxy %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		p.tb.Fatalf("toxiproxy %s %s: %s: %s", method, path, resp.Status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			p.tb.Fatalf("toxiproxy %s %s: %v in %s", method, path, err, b)
		}
	}
}

// addToxic adds a toxic, given as Toxiproxy's JSON.
func addToxic(tb testing.TB, p *toxiProxy, toxic string) {
	tb.Helper()
	p.call("POST", "/proxies/redis/toxics", json.RawMessage(toxic), nil)
}

// removeToxic removes the toxic called name.
func (p *toxiProxy) removeToxic(name string) {
	p.tb.Helper()
	p.call("DELETE", "/proxies/redis/toxics/"+name, nil, nil)
}

// enable starts (true) or stops (false) the proxy: stopped, its port
// refuses connections and the open ones are closed.
func (p *toxiProxy) enable(on bool) {
	p.tb.Helper()
	p.call("POST", "/proxies/redis", map[string]any{"enabled": on}, nil)
}
