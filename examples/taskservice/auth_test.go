package main

import (
	"bufio"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Probes: no /admin/* or /metrics route answers 2xx without the token,
// whatever the path spelling or method (raw requests, no client cleaning).
func TestAdminNoBypass(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.adminToken = "s3cret" })
	addr := strings.TrimPrefix(ta.srv.URL, "http://")
	paths := []string{"/admin/", "/admin", "//admin/", "/admin/../admin/", "/./admin/", "/admin/%2e%2e/admin/",
		"/admin/cache-stats", "/admin//cache-stats", "/admin/cache-stats/", "/ADMIN/", "/admin/dashboard.json",
		"/metrics", "/metrics/", "//metrics", "/tasks/../metrics", "/admin/cache/task?prefix=v1:tasks:",
		"/admin/cache-stats?token=", "/admin/cache-stats?token=s3cret%00"}
	for _, m := range []string{"GET", "HEAD", "POST", "DELETE", "OPTIONS", "PUT", "get"} {
		for _, p := range paths {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			req := m + " " + p + " HTTP/1.1\r\nHost: x\r\nCookie: taskservice_admin=\r\nAuthorization: Bearer \r\nConnection: close\r\n\r\n"
			c.Write([]byte(req))
			res, err := http.ReadResponse(bufio.NewReader(c), nil)
			c.Close()
			if err != nil {
				t.Fatalf("%s %s: %v", m, p, err)
			}
			if res.StatusCode/100 == 2 {
				t.Errorf("%s %s = %d without the token", m, p, res.StatusCode)
			}
		}
	}
}

// login redirects to r.URL.Path, the decoded path: an encoded "../" and a
// backslash in a path segment survive the mux (the escaped path is clean)
// and http.Redirect's path.Clean turns them into "/\evil.example", which
// browsers read as the protocol-relative //evil.example. Needs the valid
// token in the URL, so low impact, but the target should be a constant.
func TestLoginRedirectTarget(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.adminToken = "s3cret" })
	req := httptest.NewRequest("GET", "/admin/..%2F%5Cevil.example?token=s3cret", nil)
	w := httptest.NewRecorder()
	ta.Handler.ServeHTTP(w, req)
	loc := w.Header().Get("Location")
	t.Logf("status %d Location %q", w.Code, loc)
	if strings.HasPrefix(loc, "//") || strings.HasPrefix(loc, "/\\") {
		t.Fatalf("login redirects off-site: Location %q", loc)
	}
}
