// Command kstatus prints what sigs.k8s.io/cli-utils/pkg/kstatus/status (the library Flux, kpt and
// Helm 4 use) computes for Kubernetes objects read from stdin: one JSON object per line, or a List.
// Each object yields one JSON line: {"name": ..., "status": "Current|InProgress|Failed|...", "message": ...}.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type line struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
	Error   string `json:"error,omitempty"`
}

func compute(obj map[string]interface{}) line {
	u := &unstructured.Unstructured{Object: obj}
	out := line{Name: u.GetName()}
	res, err := status.Compute(u)
	if err != nil {
		out.Status, out.Error = string(status.UnknownStatus), err.Error()
		return out
	}
	out.Status, out.Message = string(res.Status), res.Message
	return out
}

func objects(obj map[string]interface{}) ([]map[string]interface{}, error) {
	items, isList := obj["items"].([]interface{})
	if !isList {
		return []map[string]interface{}{obj}, nil
	}
	out := make([]map[string]interface{}, 0, len(items))
	for _, item := range items {
		m, ok := item.(map[string]interface{})
		if !ok {
			return nil, fmt.Errorf("a list item is not an object")
		}
		out = append(out, m)
	}
	return out, nil
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
	os.Exit(1)
}

func main() {
	// A stream of JSON values: one object per line, a List, or `kubectl get -o json` output.
	dec := json.NewDecoder(bufio.NewReader(os.Stdin))
	enc := json.NewEncoder(os.Stdout)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			return
		} else if err != nil {
			fail(err)
		}
		// As the API machinery decodes: whole numbers become int64 (status.Compute reads generations as such).
		var obj map[string]interface{}
		if err := utiljson.Unmarshal(raw, &obj); err != nil {
			fail(err)
		}
		objs, err := objects(obj)
		if err != nil {
			fail(err)
		}
		for _, o := range objs {
			if err := enc.Encode(compute(o)); err != nil {
				fail(err)
			}
		}
	}
}
