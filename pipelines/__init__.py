"""synpref.pipelines"""
