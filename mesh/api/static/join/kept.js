// The model kept in this browser (IndexedDB, by CID), so a reload or a phone reopening the page loads it
// without fetching it again.
// A file is stored only after every block of it was verified against its CID, and found again only by that
// CID, so a kept copy needs no second check. One model is kept (the newest); IndexedDB works outside secure
// contexts too (a phone on http://LAN-ADDRESS/join), unlike the Cache API. Failures (quota, private mode)
// only mean the next visit fetches again.

function modelStore() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open("shoal-models", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("files");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function storeRequest(db, mode, op) {
  return new Promise((resolve, reject) => {
    const transaction = db.transaction("files", mode);
    const request = op(transaction.objectStore("files"));
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = () => reject(transaction.error);
    transaction.onabort = () => reject(transaction.error);
  });
}

/** The Blob kept under `cid`, or null. */
export async function cached(cid) {
  try {
    const db = await modelStore();
    try {
      const blob = await storeRequest(db, "readonly", (store) => store.get(cid));
      return blob instanceof Blob ? blob : null;
    } finally {
      db.close();
    }
  } catch (error) {
    console.info("no kept model", error);
    return null;
  }
}

/** Keep `blob` (verified against `cid`) as the one kept model. */
export async function keep(cid, blob) {
  try {
    const db = await modelStore();
    try {
      await storeRequest(db, "readwrite", (store) => { store.clear(); return store.put(blob, cid); });
    } finally {
      db.close();
    }
  } catch (error) {
    console.info("model not kept", error);
  }
}
