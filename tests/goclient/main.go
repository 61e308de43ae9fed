// Command goclient drives a mirror in API mode with Ollama's official Go client library
// (github.com/ollama/ollama/api), as Go programs that embed Ollama's client do, and checks every answer.
//
//	goclient -host http://127.0.0.1:11434 -model tiny -digest <manifest hex> -size <bytes>
//
// It prints one line per step and exits 1 at the first answer that is not what Ollama would give.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/ollama/ollama/api"
)

func main() {
	host := flag.String("host", "http://127.0.0.1:11434", "the mirror's URL")
	model := flag.String("model", "tiny", "a model the mirror's upstream has")
	digest := flag.String("digest", "", "the hex sha256 of its manifest, as ollama list shows it")
	size := flag.Int64("size", 0, "the size ollama list shows for it (layers plus config)")
	flag.Parse()
	base, err := url.Parse(*host)
	if err != nil {
		fail("bad -host: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client := api.NewClient(base, http.DefaultClient)

	if err := client.Heartbeat(ctx); err != nil {
		fail("heartbeat: %v", err)
	}
	step("heartbeat")
	version, err := client.Version(ctx)
	if err != nil || version == "" {
		fail("version: %q, %v", version, err)
	}
	step("version %s", version)

	var statuses []string
	sawBytes := false
	err = client.Pull(ctx, &api.PullRequest{Model: *model}, func(p api.ProgressResponse) error {
		if len(statuses) == 0 || statuses[len(statuses)-1] != p.Status {
			statuses = append(statuses, p.Status)
		}
		if p.Digest != "" && p.Total > 0 && p.Completed == p.Total {
			sawBytes = true
		}
		return nil
	})
	if err != nil {
		fail("pull: %v", err)
	}
	if statuses[0] != "pulling manifest" || statuses[len(statuses)-1] != "success" || !sawBytes {
		fail("pull: unexpected progress %q", statuses)
	}
	step("pull %s: %d statuses, %s ... %s", *model, len(statuses), statuses[0], statuses[len(statuses)-1])

	listed, err := client.List(ctx)
	if err != nil {
		fail("list: %v", err)
	}
	found := false
	for _, m := range listed.Models {
		if m.Name == *model+":latest" {
			found = true
			if *digest != "" && m.Digest != *digest {
				fail("list: digest %s, want %s", m.Digest, *digest)
			}
			if *size != 0 && m.Size != *size {
				fail("list: size %d, want %d", m.Size, *size)
			}
			if m.Details.Format != "gguf" || m.ModifiedAt.IsZero() {
				fail("list: details %+v, modified %v", m.Details, m.ModifiedAt)
			}
		}
	}
	if !found {
		fail("list: %s:latest is not listed", *model)
	}
	step("list: %s:latest %s %d bytes", *model, short(*digest), *size)

	shown, err := client.Show(ctx, &api.ShowRequest{Model: *model})
	if err != nil {
		fail("show: %v", err)
	}
	if shown.ModelInfo["general.architecture"] == nil || shown.Details.Format != "gguf" || shown.Template == "" {
		fail("show: model_info %v, details %+v, template %q", shown.ModelInfo, shown.Details, shown.Template)
	}
	step("show: %v, %s", shown.ModelInfo["general.architecture"], shown.Details.ParameterSize)

	err = client.Pull(ctx, &api.PullRequest{Model: "no-such-model"}, func(api.ProgressResponse) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "file does not exist") {
		fail("pull of an unknown model: %v", err)
	}
	step("pull no-such-model: %v", err)

	if err := client.Delete(ctx, &api.DeleteRequest{Model: *model}); err != nil {
		fail("delete: %v", err)
	}
	_, err = client.Show(ctx, &api.ShowRequest{Model: *model})
	var status api.StatusError
	if !errors.As(err, &status) || status.StatusCode != http.StatusNotFound {
		fail("show after delete: %v", err)
	}
	step("delete, then show: %d %s", status.StatusCode, status.ErrorMessage)
	fmt.Println("ok")
}

func short(digest string) string {
	if len(digest) > 12 {
		return digest[:12]
	}
	return digest
}

func step(format string, args ...any) {
	fmt.Printf(format+"\n", args...)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}
