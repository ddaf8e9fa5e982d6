/*
  The gateway's own YARA rules for mail. Metadata:
    symbol      the symbol in rules/symbols.toml (its score and French text); without it,
                YARA_MATCH
    description English, for logs
*/

rule Eicar_Test_File
{
    meta:
        symbol = "YARA_EICAR"
        description = "EICAR anti-virus test file"
    strings:
        $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
    condition:
        $eicar in (0..1024)
}

rule Office_AutoExec_Macro
{
    meta:
        symbol = "YARA_OFFICE_AUTOEXEC"
        description = "Office VBA project with an auto-executing entry point"
    strings:
        $vba1 = "VBA_PROJECT" wide ascii nocase
        $vba2 = "Attribute VB_Name" ascii
        $a1 = "AutoOpen" ascii nocase
        $a2 = "Document_Open" ascii nocase
        $a3 = "Workbook_Open" ascii nocase
        $a4 = "Auto_Open" ascii nocase
        $a5 = "AutoExec" ascii nocase
    condition:
        any of ($vba*) and any of ($a*)
}

rule PDF_JavaScript_Action
{
    meta:
        symbol = "YARA_PDF_JS_ACTION"
        description = "PDF that runs JavaScript when opened"
    strings:
        $pdf = "%PDF-"
        $open = "/OpenAction" ascii
        $aa = "/AA" ascii
        $js1 = "/JavaScript" ascii
        $js2 = "/JS" ascii
    condition:
        $pdf in (0..1024) and ($open or $aa) and any of ($js*)
}

rule HTML_Smuggling_Blob
{
    meta:
        symbol = "YARA_HTML_SMUGGLING"
        description = "HTML building a file download from an encoded blob in script"
    strings:
        $script = "<script" nocase
        $b1 = "atob(" nocase
        $b2 = "Uint8Array" nocase
        $b3 = "new Blob" nocase
        $d1 = "msSaveOrOpenBlob" nocase
        $d2 = ".download" nocase
        $d3 = "createObjectURL" nocase
    condition:
        // No regex over the blob itself: a pattern without literal atoms makes YARA read
        // every byte slowly. A page of this size that decodes and saves a blob is enough.
        filesize > 10KB and $script and 2 of ($b*) and any of ($d*)
}

rule LNK_Dropper_Command
{
    meta:
        symbol = "YARA_LNK_COMMAND"
        description = "Windows shortcut that launches a command interpreter"
    strings:
        $lnk = { 4C 00 00 00 01 14 02 00 }
        $c1 = "powershell" nocase wide ascii
        $c2 = "cmd.exe" nocase wide ascii
        $c3 = "mshta" nocase wide ascii
        $c4 = "wscript" nocase wide ascii
        $c5 = "rundll32" nocase wide ascii
    condition:
        $lnk at 0 and any of ($c*)
}

rule French_Health_Lure_In_Document
{
    meta:
        symbol = "YARA_FR_HEALTH_LURE"
        description = "Document asking for bank details in the name of the Assurance Maladie"
    strings:
        $org1 = "Assurance Maladie" nocase ascii wide
        $org2 = "carte Vitale" nocase ascii wide
        $org3 = "Mon espace sant" nocase ascii wide
        $ask1 = "relev\xc3\xa9 d'identit\xc3\xa9 bancaire" nocase ascii
        $ask2 = "coordonn\xc3\xa9es bancaires" nocase ascii
        $ask3 = "coordonnees bancaires" nocase ascii wide
        $ask4 = "remboursement" nocase ascii wide
        $ask5 = "votre IBAN" nocase ascii wide
    condition:
        any of ($org*) and 2 of ($ask*)
}
