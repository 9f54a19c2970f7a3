package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
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

// A browser that opens /admin/ without the token gets a page that says
// how to log in; API clients, and every other admin endpoint, get the
// JSON 401.
func TestAdminLoginPage(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.adminToken = "s3cret" })
	const browser = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
	for _, c := range []struct {
		method, path, accept, auth string
		want                       int
		html                       bool
	}{
		{"GET", "/admin/", browser, "", 401, true},
		{"HEAD", "/admin/", browser, "", 401, true},
		{"GET", "/admin/", "text/html", "", 401, true},
		{"GET", "/admin/", "TEXT/HTML; q=0.9, application/json; q=0.5", "", 401, true},
		{"GET", "/admin/?token=wrong", browser, "", 401, true},
		{"GET", "/admin/", browser, "Bearer wrong", 401, true},
		{"GET", "/admin/no-such-page", browser, "", 401, true},
		{"GET", "/admin/", "", "", 401, false},
		{"GET", "/admin/", "*/*", "", 401, false}, // curl, fetch
		{"GET", "/admin/", "application/json", "", 401, false},
		{"GET", "/admin/", "application/json, text/html", "", 401, false},
		{"GET", "/admin/", "text/html;q=0.5, application/json", "", 401, false},
		{"GET", "/admin/", "text/html;q=0", "", 401, false},
		{"GET", "/admin/", "text/html;q=nan", "", 401, false},
		{"GET", "/admin/dashboard.json", browser, "", 401, false},
		{"GET", "/admin/cache-stats", browser, "", 401, false},
		{"GET", "/metrics", browser, "", 401, false},
		{"DELETE", "/admin/cache/task?prefix=v1:tasks:", browser, "", 401, false},
		{"GET", "/admin/", browser, "Bearer s3cret", 200, true}, // the dashboard itself
	} {
		name := fmt.Sprintf("%s %s Accept %q Authorization %q", c.method, c.path, c.accept, c.auth)
		req := httptest.NewRequest(c.method, c.path, nil)
		if c.accept != "" {
			req.Header.Set("Accept", c.accept)
		}
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		w := httptest.NewRecorder()
		ta.Handler.ServeHTTP(w, req)
		h, body := w.Header(), w.Body.String()
		if w.Code != c.want {
			t.Errorf("%s: %d, want %d", name, w.Code, c.want)
			continue
		}
		if h.Get("Cache-Control") != "no-store" || h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("%s: Cache-Control %q, X-Content-Type-Options %q", name, h.Get("Cache-Control"), h.Get("X-Content-Type-Options"))
		}
		if c.want == 200 {
			continue
		}
		if h.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: no WWW-Authenticate", name)
		}
		if !c.html {
			var e apiError
			if ct := h.Get("Content-Type"); ct != "application/json" || json.Unmarshal(w.Body.Bytes(), &e) != nil || e.Error == "" {
				t.Errorf("%s: want the JSON 401, got %s %q", name, ct, body)
			}
			continue
		}
		csp := h.Get("Content-Security-Policy")
		if ct := h.Get("Content-Type"); ct != "text/html; charset=utf-8" {
			t.Errorf("%s: Content-Type %q, want the HTML page", name, ct)
		}
		if !strings.HasPrefix(csp, "default-src 'none'; style-src 'sha256-") || strings.Contains(csp, "script-src") ||
			!strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "form-action 'none'") {
			t.Errorf("%s: CSP %q", name, csp)
		}
		if !strings.Contains(h.Get("Vary"), "Accept") {
			t.Errorf("%s: Vary %q, want Accept", name, h.Get("Vary"))
		}
		if c.method == "HEAD" {
			continue
		}
		for _, want := range []string{"/admin/?token=&lt;ADMIN_TOKEN&gt;", "Authorization: Bearer &lt;ADMIN_TOKEN&gt;"} {
			if !strings.Contains(body, want) {
				t.Errorf("%s: the page does not say %q", name, want)
			}
		}
		if strings.Contains(body, "wrong") || strings.Contains(body, "s3cret") || strings.Contains(body, "<script") {
			t.Errorf("%s: the page echoes the request or has a script:\n%s", name, body)
		}
	}
}

func TestPrefersHTML(t *testing.T) {
	for accept, want := range map[string]bool{
		"": false, "*/*": false, "application/json": false, "text/plain": false,
		"text/html": true, "text/*": true, "Text/HTML": true, " text/html ; q=1 ": true,
		"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8":            true, // Firefox
		"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8": true, // Chromium
		"application/json;q=0.9, text/html":                                          true,
		"application/json, text/html":                                                false,
		"text/*;q=0.9, text/html;q=0.1, */*;q=0.5":                                   false, // the most specific range decides
		"text/html;q=2":  false,
		"text/html;q=-1": false,
		"text/html;q=":   false,
		"text/html;level=1;q=0.7, application/json;q=0.6": true,
		"text/html, */*;q=0.8, application/*;q=0.9":       true,
	} {
		if got := prefersHTML(accept); got != want {
			t.Errorf("prefersHTML(%q) = %v, want %v", accept, got, want)
		}
	}
}

// TestAdminLoopbackWithoutToken: without ADMIN_TOKEN the admin routes and
// /metrics answer loopback clients only.
func TestAdminLoopbackWithoutToken(t *testing.T) {
	ta := newTestApp(t, nil)
	for _, tc := range []struct {
		remote string
		code   int
	}{{"127.0.0.1:5000", 200}, {"[::1]:5000", 200}, {"203.0.113.7:5000", 403}, {"10.0.0.2:5000", 403}} {
		for _, path := range []string{"/admin/cache-stats", "/metrics"} {
			req := httptest.NewRequest("GET", path, nil)
			req.RemoteAddr = tc.remote
			rec := httptest.NewRecorder()
			ta.Handler.ServeHTTP(rec, req)
			if rec.Code != tc.code {
				t.Errorf("GET %s from %s = %d, want %d", path, tc.remote, rec.Code, tc.code)
			}
		}
	}
}

// TestAdminCrossOrigin: a state-changing admin request from another origin
// (another site, or a page on another port of the same host, which the
// SameSite=Strict cookie reaches) is refused even with a valid cookie; the
// same request from the app's own page, or from a client that is not a
// browser, goes through.
func TestAdminCrossOrigin(t *testing.T) {
	ta := newTestApp(t, func(e *env) { e.adminToken = "s3cret" })
	cookie := &http.Cookie{Name: adminCookie, Value: ta.api.cookieValue(time.Now())}
	for _, tc := range []struct {
		name    string
		headers map[string]string
		code    int
	}{
		{"another site", map[string]string{"Sec-Fetch-Site": "cross-site"}, 403},
		{"another port of this host", map[string]string{"Sec-Fetch-Site": "same-site"}, 403},
		{"Origin of another host", map[string]string{"Origin": "http://evil.example"}, 403},
		{"the app's own page", map[string]string{"Sec-Fetch-Site": "same-origin"}, 200},
		{"not a browser", nil, 200},
	} {
		req := httptest.NewRequest("POST", "/admin/orgs/acme/lists/invalidate", nil)
		req.RemoteAddr = "127.0.0.1:5000"
		req.AddCookie(cookie)
		for k, v := range tc.headers {
			req.Header.Set(k, v)
		}
		rec := httptest.NewRecorder()
		ta.Handler.ServeHTTP(rec, req)
		if rec.Code/100 != tc.code/100 {
			t.Errorf("%s: %d %s, want %d", tc.name, rec.Code, rec.Body, tc.code)
		}
	}
}

// TestAdminCookieAge: the login cookie carries its issue time: one older
// than adminCookieAge, one from the future, one whose time was edited and
// one from another token are refused.
func TestAdminCookieAge(t *testing.T) {
	a := &API{adminToken: "s3cret"}
	now := time.Now()
	fresh := a.cookieValue(now.Add(-time.Hour))
	other := (&API{adminToken: "other"}).cookieValue(now)
	_, mac, _ := strings.Cut(fresh, ".")
	for v, want := range map[string]bool{
		fresh: true,
		a.cookieValue(now.Add(-adminCookieAge - time.Minute)): false,
		a.cookieValue(now.Add(time.Hour)):                     false,
		fmt.Sprintf("%d.%s", now.Unix(), mac):                 false,
		other:                                                 false,
		"":                                                    false,
		"x.y":                                                 false,
	} {
		if got := a.cookieOK(v, now); got != want {
			t.Errorf("cookieOK(%q) = %v, want %v", v, got, want)
		}
	}
}
